"""Encoder-decoder (text-to-text) checkpoint folders: T5 and Flan-T5 (``T5ForConditionalGeneration``).

The model is exported as two steps, ``encode`` and ``decode`` (exporter.seq2seq); ``--seq-len`` is the
fixed source length (inputs are padded to it), ``--context-len`` how many tokens the decoder may write.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError
from .base import LoadedModel, SourceOptions, file_sha256, fingerprint
from .checkpoint import load_weights_checked, model_name, read_json, weights_fingerprint

SUPPORTED = {"t5": "T5 / Flan-T5 (T5ForConditionalGeneration)"}
GGUF_ARCHITECTURES = {"t5"}  # llama.cpp's architecture names
DEFAULT_SOURCE_LEN = 128
DEFAULT_MAX_TARGET = 64


@dataclass
class Seq2Seq:
    model: nn.Module  # the fp32 reference, never modified
    tokenizer: Any
    source_len: int
    max_target: int
    start_token: int  # the decoder's first input (T5: the pad token)
    eos_ids: list[int]
    generation: dict[str, Any] = field(default_factory=dict)
    sentencepiece: Path | None = None  # the checkpoint's spiece.model, which apps on SentencePiece read

    def working_copy(self) -> nn.Module:
        return copy.deepcopy(self.model)


def check_architecture(config: dict[str, Any], where: str) -> None:
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED:
        raise SourceError(f"{where}: encoder-decoder model_type '{model_type}' is not supported; edgeship exports "
                          f"{', '.join(SUPPORTED.values())}")


def load_folder(folder: Path, config: dict[str, Any], options: SourceOptions) -> LoadedModel:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    check_architecture(config, str(folder))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise SourceError(f"{folder}: no tokenizer (tokenizer.json or spiece.model); a text-to-text model needs "
                          "one for an app-ready bundle. Save it with tokenizer.save_pretrained(folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise SourceError(f"{folder}: the tokenizer does not load ({str(exc).splitlines()[0][:200]})") from exc
    model = load_weights_checked(AutoModelForSeq2SeqLM, folder, dtype=torch.float32)
    generation_file = folder / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else {}
    sentencepiece = folder / "spiece.model"
    return _loaded(model, tokenizer, model_name(folder), options, generation,
                   sentencepiece if sentencepiece.is_file() else None,
                   {"kind": "hf-folder", "path": str(folder.resolve())}, weights_fingerprint(folder), str(folder))


def load_gguf(path: Path, header: dict[str, Any], options: SourceOptions) -> LoadedModel:
    """A T5 GGUF as llama.cpp's converter writes it (architecture "t5"), read by transformers.

    transformers marks every T5 GGUF gated but keeps ReLU as its activation; llama.cpp runs a gated GELU
    where the file has ffn_gate tensors (Flan-T5, T5 v1.1) and a plain ReLU otherwise (T5 v1.0), so the
    feed-forward is set from the tensors, as llama.cpp computes it."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    where = str(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        config.feed_forward_proj = "gated-gelu" if any(".ffn_gate." in name for name in header["tensor_names"]) else "relu"
        config.is_gated_act = config.feed_forward_proj == "gated-gelu"
        config.dense_act_fn = "gelu_new" if config.is_gated_act else "relu"
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                      dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SourceError(f"{where}: transformers could not load this T5 GGUF "
                          f"({str(exc).splitlines()[0][:200]})") from exc
    # The weights are plain fp32 tensors now; the GGUF's quantisation config would stop save_pretrained.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    return _loaded(model, tokenizer, path.stem.replace(".", "-").lower(), options, {}, None,
                   {"kind": "gguf", "path": str(path.resolve()), "gguf_tensor_types": header["tensor_types"]},
                   file_sha256(path), where)


def _loaded(model: nn.Module, tokenizer: Any, name: str, options: SourceOptions, generation: dict[str, Any],
            sentencepiece: Path | None, source: dict[str, Any], weights: str, where: str) -> LoadedModel:
    model.eval().requires_grad_(False)
    source_len = options.seq_len or DEFAULT_SOURCE_LEN
    max_target = options.context_len or DEFAULT_MAX_TARGET
    if source_len < 4 or max_target < 2:
        raise SourceError(f"{where}: --seq-len (source tokens, {source_len}) must be at least 4 and --context-len "
                          f"(decoder tokens, {max_target}) at least 2")
    eos = generation.get("eos_token_id", model.config.eos_token_id)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    start = model.config.decoder_start_token_id
    seq2seq = Seq2Seq(model=model, tokenizer=tokenizer, source_len=source_len, max_target=max_target,
                      start_token=int(start if start is not None else model.config.pad_token_id or 0),
                      eos_ids=eos_ids, generation=generation, sentencepiece=sentencepiece)
    sample = (torch.zeros(1, source_len, dtype=torch.long), torch.ones(1, source_len, dtype=torch.long))
    return LoadedModel(
        name=name, module=model, input_names=("input_ids", "attention_mask"), output_names=("logits",),
        sample_inputs=sample,
        source={**source, "task": "text2text-generation", "architecture": model.config.model_type,
                "seq_len": source_len, "context_len": max_target},
        fingerprint=fingerprint(weights, f"seq2seq:{source_len}:{max_target}"),
        logits_outputs=frozenset({"logits"}), seq2seq=seq2seq,
    )
