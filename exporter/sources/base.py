"""The one shape every model source produces."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SourceError


@dataclass(frozen=True)
class SourceOptions:
    seq_len: int | None = None  # encoders: sequence length of the exported inputs
    batch_size: int = 1
    context_len: int | None = None  # language models: KV-cache length (prompt + generated tokens)


class FlatModule(nn.Module):
    """Positional tensors in, a tuple of tensors out, whatever the wrapped model takes and returns.

    Every backend wants positional inputs and flat outputs; doing it once here means formats and the
    device runner only ever see ``(inputs...) -> (outputs...)`` with stable names.
    """

    def __init__(self, inner: nn.Module, input_names: Sequence[str], keyword: bool, output_keys: Sequence[str]):
        super().__init__()
        self.inner = inner
        self.input_names = tuple(input_names)
        self.keyword = keyword
        self.output_keys = tuple(output_keys)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(**dict(zip(self.input_names, args))) if self.keyword else self.inner(*args)
        flat = flatten_outputs(out)
        return tuple(flat[key] for key in self.output_keys)


def flatten_outputs(out: Any) -> dict[str, torch.Tensor]:
    """Name every tensor a model returns: a tensor, a tuple/list, a dict or a HF ModelOutput."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):  # HF ModelOutput is a Mapping of its non-None fields
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = [(f"output_{i}", value) for i, value in enumerate(out)]
    else:
        raise SourceError(f"the model returned {type(out).__name__}; return a tensor, a tuple or a dict of tensors")
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif value is not None:
            raise SourceError(f"model output '{key}' is {type(value).__name__}, not a tensor")
    if not flat:
        raise SourceError("the model returned no tensors")
    return flat


@dataclass
class LoadedModel:
    """A model ready to export: eval mode, no grads, positional inputs, named outputs."""

    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sample_inputs: tuple[torch.Tensor, ...]
    source: dict[str, Any]  # what the manifest says about where the model came from
    fingerprint: str  # changes whenever the model's weights, code or inputs change
    logits_outputs: frozenset[str] = frozenset()  # outputs whose argmax is a prediction
    padding_mask: str | None = None  # input marking real tokens; padded positions are not compared
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]] | None = None  # fresh inputs by seed
    program: torch.export.ExportedProgram | None = field(default=None, repr=False)  # when given traced
    language: Any = field(default=None, repr=False)  # sources.decoder.Language for causal LMs
    seq2seq: Any = field(default=None, repr=False)  # sources.seq2seq.Seq2Seq for encoder-decoders (T5)

    @property
    def kind(self) -> str:
        """What a target's artifact is built for (its `models` key): "language" (a causal LM, or an
        encoder-decoder, judged by the same generation thresholds) or "tensor"."""
        return "language" if self.language is not None or self.seq2seq is not None else "tensor"

    def fresh_inputs(self, count: int, seed: int = 1234) -> list[tuple[torch.Tensor, ...]]:
        """Inputs the model was not traced with, so parity is not measured on the sample itself."""
        maker = self.make_inputs or (lambda s: random_like(self.sample_inputs, s))
        return [maker(seed + i) for i in range(count)]


def random_like(sample: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    """Random tensors shaped like the sample: floats on the sample's scale, integers in its range."""
    generator = torch.Generator().manual_seed(seed)
    fresh = []
    for tensor in sample:
        if tensor.is_floating_point():
            scale = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
            scale = scale if scale > 0 else 1.0
            mean = float(tensor.float().mean())
            fresh.append((torch.randn(tensor.shape, generator=generator) * scale + mean).to(tensor.dtype))
        elif tensor.dtype == torch.bool:
            fresh.append(tensor.clone())
        else:
            low, high = int(tensor.min()), int(tensor.max())
            fresh.append(torch.randint(low, high + 1, tensor.shape, generator=generator, dtype=tensor.dtype))
    return tuple(fresh)


def prepare(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
    *,
    what: str,
) -> tuple[FlatModule, tuple[str, ...], tuple[torch.Tensor, ...], tuple[str, ...]]:
    """Wrap ``model`` as a FlatModule, run it once, and name its inputs and outputs."""
    if not isinstance(model, nn.Module):
        raise SourceError(f"{what} gave {type(model).__name__}, not a torch.nn.Module")
    if isinstance(inputs, dict):
        names, values, keyword = tuple(inputs), tuple(inputs.values()), True
    elif isinstance(inputs, (tuple, list)):
        values, keyword = tuple(inputs), False
        names = tuple(f"input_{i}" for i in range(len(values)))
    elif isinstance(inputs, torch.Tensor):
        values, names, keyword = (inputs,), ("input_0",), False
    else:
        raise SourceError(f"{what}: sample inputs must be a tuple of tensors or a dict of tensors, got {type(inputs).__name__}")
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise SourceError(f"{what}: sample input '{name}' is {type(value).__name__}, not a tensor")
    try:
        model.eval()
    except NotImplementedError:  # a torch.export program's module is already in inference form
        pass
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            out = model(**dict(zip(names, values))) if keyword else model(*values)
    except Exception as exc:
        raise SourceError(f"{what}: the model fails on its own sample inputs: {type(exc).__name__}: {exc}") from exc
    output_names = tuple(flatten_outputs(out))
    flat = FlatModule(model, names, keyword, output_names)
    flat.training = False  # not .eval(): that would recurse into a torch.export module, which refuses
    return flat, names, values, output_names


def fingerprint(*parts: bytes | str, tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    for key, tensor in sorted((tensors or {}).items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Any, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
