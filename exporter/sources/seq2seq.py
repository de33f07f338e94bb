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
from .base import LoadedModel, SourceOptions, fingerprint
from .checkpoint import load_weights_checked, model_name, read_json, weights_fingerprint

SUPPORTED = {"t5": "T5 / Flan-T5 (T5ForConditionalGeneration)"}
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
    model.eval().requires_grad_(False)
    source_len = options.seq_len or DEFAULT_SOURCE_LEN
    max_target = options.context_len or DEFAULT_MAX_TARGET
    if source_len < 4 or max_target < 2:
        raise SourceError(f"{folder}: --seq-len (source tokens, {source_len}) must be at least 4 and --context-len "
                          f"(decoder tokens, {max_target}) at least 2")
    generation_file = folder / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else {}
    eos = generation.get("eos_token_id", model.config.eos_token_id)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    start = model.config.decoder_start_token_id
    seq2seq = Seq2Seq(model=model, tokenizer=tokenizer, source_len=source_len, max_target=max_target,
                      start_token=int(start if start is not None else model.config.pad_token_id or 0),
                      eos_ids=eos_ids, generation=generation,
                      sentencepiece=folder / "spiece.model" if (folder / "spiece.model").is_file() else None)
    sample = (torch.zeros(1, source_len, dtype=torch.long), torch.ones(1, source_len, dtype=torch.long))
    return LoadedModel(
        name=model_name(folder), module=model, input_names=("input_ids", "attention_mask"), output_names=("logits",),
        sample_inputs=sample,
        source={"kind": "hf-folder", "path": str(folder.resolve()), "task": "text2text-generation",
                "architecture": config.get("model_type"), "seq_len": source_len, "context_len": max_target},
        fingerprint=fingerprint(weights_fingerprint(folder), f"seq2seq:{source_len}:{max_target}"),
        logits_outputs=frozenset({"logits"}), seq2seq=seq2seq,
    )
