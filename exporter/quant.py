"""Quantisation schemes, named once, and the library object that implements each per format.

A scheme says what happens to weights and activations; the table below says which library
does it for which format. The format modules ask this table and never invent their own flags.
Library imports stay inside the builders so that exporting only .tflite never imports
coremltools or torchao.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int | None  # None: weights stay float
    dynamic_activations: bool  # activations quantised to int8 at run time
    grouped: bool  # needs a group_size (block-wise scales)
    summary: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", None, False, False, "float32 weights and compute"),
        Scheme("fp16", None, False, False, "float16 weights and compute"),
        Scheme("int8-dynamic", 8, True, False, "int8 per-channel weights, int8 dynamic activations"),
        # TFLite's classic dynamic range: the one runtimes before LiteRT (tflite-runtime 2.14) compute right
        Scheme("int8-dynamic-tensor", 8, True, False, "int8 per-tensor weights, int8 dynamic activations"),
        Scheme("int8-weight", 8, False, False, "int8 weights (per channel, or per block with group_size), float compute"),
        Scheme("int4-weight", 4, False, True, "int4 block-wise weights, float compute"),
        Scheme("8da4w", 4, True, True, "int4 grouped weights, int8 dynamic activations"),
        Scheme("8da8w", 8, True, True, "int8 grouped weights, int8 dynamic activations"),
    )
}

# Block sizes ai-edge-quantizer has kernels for.
TFLITE_BLOCK_SIZES = (32, 64, 128, 256)


def _torchao_dynamic(bits: int) -> Callable[[int | None], Any]:
    def build(group_size: int | None) -> Any:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        granularity = PerGroup(group_size) if group_size else PerAxis(0)
        dtype = torch.int4 if bits == 4 else torch.int8
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)

    return build


def _coreml_linear(bits: int) -> Callable[[int | None], Any]:
    def build(group_size: int | None) -> Any:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig

        if group_size:
            return OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=f"int{bits}", granularity="per_block",
                block_size=group_size, weight_threshold=0,
            )
        return OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=f"int{bits}", granularity="per_channel", weight_threshold=0
        )

    return build


def _tflite(bits: int, *, dynamic: bool, per_tensor: bool = False) -> Callable[[int | None], Any]:
    """Returns (granularity, num_bits, dynamic); the tflite format turns it into a recipe per layer."""

    def build(group_size: int | None) -> Any:
        from ai_edge_quantizer import qtyping

        granularity = (
            getattr(qtyping.QuantGranularity, f"BLOCKWISE_{group_size}")
            if group_size
            else qtyping.QuantGranularity.TENSORWISE if per_tensor else qtyping.QuantGranularity.CHANNELWISE
        )
        return {"num_bits": bits, "granularity": granularity, "dynamic": dynamic}

    return build


def _float(group_size: int | None) -> None:
    return None


# (format, scheme) -> builder(group_size) -> the library's config object.
# Not offered: pte/8da8w (XNNPACK: "Only 4b group quantization is supported"), pte/int8-weight (torchao's
# dequantize_affine has no ExecuTorch kernel), tflite/fp16 and mlpackage dynamic activations (no such kernels).
IMPLEMENTATIONS: dict[tuple[str, str], Callable[[int | None], Any]] = {
    ("pte", "fp32"): _float,
    ("pte", "int8-dynamic"): _torchao_dynamic(8),
    ("pte", "8da4w"): _torchao_dynamic(4),
    ("mlpackage", "fp32"): _float,
    ("mlpackage", "fp16"): _float,
    ("mlpackage", "int8-weight"): _coreml_linear(8),
    ("mlpackage", "int4-weight"): _coreml_linear(4),
    ("tflite", "fp32"): _float,
    ("tflite", "int8-dynamic"): _tflite(8, dynamic=True),
    ("tflite", "int8-dynamic-tensor"): _tflite(8, dynamic=True, per_tensor=True),
    ("tflite", "8da8w"): _tflite(8, dynamic=True),
    ("tflite", "8da4w"): _tflite(4, dynamic=True),
    ("tflite", "int8-weight"): _tflite(8, dynamic=False),
    ("tflite", "int4-weight"): _tflite(4, dynamic=False),
}


def supported_schemes(fmt: str) -> list[str]:
    return [scheme for (f, scheme) in IMPLEMENTATIONS if f == fmt]


def library_config(fmt: str, scheme: str, group_size: int | None) -> Any:
    return IMPLEMENTATIONS[(fmt, scheme)](group_size)


@dataclass(frozen=True)
class LayerDecision:
    """What happens to one weight-carrying layer, and why."""

    name: str
    kind: str  # "linear", "embedding"
    shape: tuple[int, ...]
    quantised: bool
    reason: str  # why it stays float, or the quantisation applied
    sparsity: float | None = None  # the fraction of the float weight's entries that are exactly zero
    stored_sparse: bool = False  # the artifact keeps only the nonzero entries and a mask (Core ML sparse_weights)

    def as_dict(self) -> dict[str, Any]:
        # "layer" is the name in the user's model; "module_path" includes edgeship's wrapper.
        return {"layer": self.name.removeprefix("inner."), "module_path": self.name, "kind": self.kind,
                "shape": list(self.shape), "quantised": self.quantised, "detail": self.reason,
                **({"sparsity": round(self.sparsity, 4)} if self.sparsity is not None else {}),
                **({"stored_sparse": True} if self.stored_sparse else {})}


def zero_fraction(weight: torch.Tensor) -> float | None:
    """How much of a float weight is exactly zero (an unstructured-pruned checkpoint's sparsity); None for a
    weight that is already quantised or not materialised (meta, or parked with no elements while
    litert-torch's child peaks)."""
    if (type(weight) not in (torch.Tensor, nn.Parameter) or weight.is_meta or not weight.is_floating_point()
            or weight.numel() == 0):
        return None
    return 1.0 - int(torch.count_nonzero(weight.detach())) / max(weight.numel(), 1)


def confirm(plan: list[LayerDecision], found: dict[str, str], missing_reason: str) -> list[LayerDecision]:
    """Hold the plan to what the artifact really holds: ``found`` maps each layer whose weight is
    quantised in the artifact to a note on how ("" for none); a planned layer missing from it is
    reported as float with ``missing_reason``, never lost silently."""
    confirmed = []
    for d in plan:
        if d.quantised and d.name not in found:
            d = replace(d, quantised=False, reason=missing_reason)
        elif d.quantised and found[d.name]:
            d = replace(d, reason=f"{d.reason} ({found[d.name]})")
        confirmed.append(d)
    return confirmed


def plan_layers(
    module: nn.Module,
    scheme: Scheme,
    group_size: int | None,
    skip_layers: tuple[str, ...] = (),
    only: frozenset[str] | None = None,
) -> list[LayerDecision]:
    """Decide for every linear layer (``only`` these names, if given) whether it is quantised, with the
    reason when it is not.

    The plan is what every format applies; each format then checks its artifact against it,
    so a layer a backend skipped on its own is reported, never lost silently.
    """
    decisions = []
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or (only is not None and name not in only):
            continue
        shape = tuple(layer.weight.shape)
        if scheme.weight_bits is None:
            quantised, reason = False, f"scheme {scheme.name} keeps weights float"
        elif any(re.fullmatch(pattern, name) for pattern in skip_layers):
            quantised, reason = False, "listed in skip_layers of the target"
        elif group_size and layer.in_features % group_size:
            quantised, reason = False, f"input width {layer.in_features} is not a multiple of group_size {group_size}"
        else:
            blocks = f"groups of {group_size}" if group_size else "per channel"
            quantised, reason = True, f"int{scheme.weight_bits} {blocks}"
        decisions.append(LayerDecision(name, "linear", shape, quantised, reason, zero_fraction(layer.weight)))
    return decisions


def linears_not_called(module: nn.Module, sample_inputs: tuple[Any, ...]) -> set[str]:
    """The linear layers a forward pass with ``sample_inputs`` never calls: their weights are read directly
    (MobileBERT's masked-LM head multiplies by its decoder's weight matrix instead of calling the decoder)."""
    linears = {name: layer for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
    called: set[str] = set()
    hooks = [layer.register_forward_pre_hook(lambda _layer, _args, name=name: called.add(name))
             for name, layer in linears.items()]
    try:
        with torch.no_grad():
            module(*sample_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return set(linears) - called
