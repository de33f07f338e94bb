"""Local Hugging Face checkpoint folders.

Encoders (feature extraction, sentence embeddings, and the masked-LM, sequence and token classification and
question-answering heads) are handled here;
decoder-only language models go to ``decoder``. The task comes from the config's architectures.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError
from .base import LoadedModel, SourceOptions, fingerprint, flatten_outputs, prepare
from .checkpoint import load_weights_checked, model_name, pruning_record, read_config, read_json, weights_fingerprint

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small models close to the data.",
    "How far is the moon from the earth?",
    "I loved this film, the acting was wonderful.",
    "The service was slow and the food arrived cold.",
    "Quantised weights make the model four times smaller.",
    "Paris is the capital and largest city of France.",
    "Please turn off the lights when you leave the room.",
)
# An encoder checkpoint's architecture ends with the head it was trained with; it is exported with that head,
# its outputs named as transformers names them. Suffix -> (task, transformers' loader).
ENCODER_HEADS = {
    "Model": ("feature-extraction", "AutoModel"),
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
}


def infer_task(config: dict[str, Any], folder: Path) -> str:
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "text-generation"
    if arch.endswith("ForConditionalGeneration") and config.get("is_encoder_decoder"):
        return "text2text-generation"
    if not arch:
        return "feature-extraction"
    for head, (task, _) in ENCODER_HEADS.items():
        if arch.endswith(head):
            return task
    raise SourceError(
        f"{folder}: architecture {arch} is not supported; edgeship exports encoders as *Model (features) or with "
        f"one of the heads {', '.join('*' + h for h in ENCODER_HEADS if h != 'Model')}, and decoder-only causal "
        "language models (*ForCausalLM), and T5 text-to-text models (T5ForConditionalGeneration)"
    )


def _encoder_loader(task: str) -> Any:
    import transformers

    return getattr(transformers, next(loader for named, loader in ENCODER_HEADS.values() if named == task))


class MeanPooling(nn.Module):
    """Sentence-transformers' mean pooling (and optional L2 normalisation) inside the exported graph."""

    def __init__(self, encoder: nn.Module, normalize: bool):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        return {"last_hidden_state": hidden, "sentence_embedding": pooled}


class BroadcastPaddingMask(nn.Module):
    """The encoder given its padding mask as the (batch, 1, 1, keys) bool mask it would build itself.
    transformers builds it by indexing the 2D mask at every position, which LiteRT writes as a bool
    GATHER_ND (version 5) that tflite-runtime 2.14 lacks; broadcasting gives the same mask without it."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> Any:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask[:, None, None, :].bool(), **extra)


def _with_broadcast_mask(model: nn.Module, sample: dict[str, torch.Tensor]) -> nn.Module:
    """BroadcastPaddingMask(model) where the model takes such a mask and computes exactly what it computes
    with the 2D one (checked on the sample with its second half padded); otherwise the model as it is."""
    if "attention_mask" not in sample:
        return model
    padded = dict(sample, attention_mask=sample["attention_mask"].clone())
    padded["attention_mask"][:, padded["attention_mask"].shape[1] // 2:] = 0
    wrapped = BroadcastPaddingMask(model)
    try:
        with torch.no_grad():
            want = flatten_outputs(model(**padded))
            got = flatten_outputs(wrapped(**padded))
    except Exception:  # a family that builds its mask another way
        return model
    same = want.keys() == got.keys() and all(
        want[k].shape == got[k].shape and torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    return wrapped if same else model


def _sentence_pooling(folder: Path) -> tuple[bool, bool]:
    """(mean pooling, normalise) from a sentence-transformers modules.json, if there is one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return False, False
    modules = read_json(modules_file, list)
    if not all(isinstance(m, dict) for m in modules):
        raise SourceError(f"{modules_file}: every entry must be a JSON object like {{\"type\": ..., \"path\": ...}}; "
                          "re-copy or re-save the checkpoint (save_pretrained)")
    types = [m.get("type", "") for m in modules]
    pooling = any(t.endswith("Pooling") for t in types)
    normalize = any(t.endswith("Normalize") for t in types)
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = folder / m.get("path", "") / "config.json"
            if cfg.is_file() and not read_json(cfg).get("pooling_mode_mean_tokens", True):
                raise SourceError(f"{cfg}: only mean pooling is supported for sentence embeddings")
    return pooling, normalize


def _tokenizer(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{folder}: the tokenizer files are there but do not load ({exc})") from exc


def load(folder: Path, options: SourceOptions) -> LoadedModel:
    config = read_config(folder)
    task = infer_task(config, folder)
    if task == "text-generation":
        from . import decoder

        return decoder.load_folder(folder, options)
    if task == "text2text-generation":
        from . import seq2seq

        return seq2seq.load_folder(folder, config, options)
    return load_encoder(folder, config, task, options)


def load_encoder(folder: Path, config: dict[str, Any], task: str, options: SourceOptions) -> LoadedModel:
    loader = _encoder_loader(task)
    pooling, normalize = _sentence_pooling(folder) if task == "feature-extraction" else (False, False)
    model = load_weights_checked(loader, folder)
    model.eval().requires_grad_(False)
    max_positions = int(config.get("max_position_embeddings", 512))
    seq_len = options.seq_len or min(128, max_positions)
    if seq_len > max_positions:
        raise SourceError(f"--seq-len {seq_len} is longer than the model's {max_positions} positions")
    tokenizer = _tokenizer(folder)
    vocab = int(config.get("vocab_size", 30522))

    # The artifacts take their inputs in the order of the model's own forward (input_ids, attention_mask,
    # token_type_ids for BERT), which is what an app developer reading the model card feeds; the tokenizer
    # returns them in another order.
    # Inputs the forward does not take (DistilBERT has no token_type_ids, a BERT tokenizer returns them) are
    # dropped.
    forward_order = list(inspect.signature(model.forward).parameters)

    def make_inputs(seed: int) -> dict[str, torch.Tensor]:
        if tokenizer is not None:
            texts = [SAMPLE_TEXTS[(seed + i) % len(SAMPLE_TEXTS)] for i in range(options.batch_size)]
            encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
            found = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        else:
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (options.batch_size, seq_len), generator=generator)
            found = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {k: found[k] for k in sorted((k for k in found if k in forward_order), key=forward_order.index)}

    sample = make_inputs(0)
    encoder = _with_broadcast_mask(model, sample)
    wrapped: nn.Module = MeanPooling(encoder, normalize) if pooling else encoder
    flat, names, values, outputs = prepare(wrapped, sample, what=str(folder))
    return LoadedModel(
        name=model_name(folder),
        module=flat, input_names=names, output_names=outputs, sample_inputs=values,
        source={"kind": "hf-folder", "path": str(folder.resolve()), "task": task,
                "architecture": (config.get("architectures") or ["?"])[0], "seq_len": seq_len,
                "tokenizer": tokenizer is not None, **pruning_record(model)},
        fingerprint=fingerprint(weights_fingerprint(folder), str(seq_len), str(options.batch_size), ",".join(names)),
        logits_outputs=frozenset(n for n in outputs if n.endswith("logits")),  # QA: start_, end_logits
        padding_mask="attention_mask" if "attention_mask" in names else None,
        make_inputs=lambda seed: tuple(make_inputs(seed).values()),
    )
