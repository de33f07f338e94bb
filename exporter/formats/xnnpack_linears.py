"""torchao's dynamically quantised linears re-expressed with ``quantized_decomposed`` ops, which trace fast.

torchao writes its quantised linears with ``choose_qparams_affine`` / ``quantize_affine`` /
``dequantize_affine``, ops that are CompositeImplicitAutograd: every pass of ExecuTorch's lowering
re-traces the graph with fake tensors and decomposes all of them again in Python, a third of the
.pte build of a language model (measured with py-spy). ``quantized_decomposed``'s per-token, per-channel
and per-channel-group ops carry meta kernels, and XNNPACK's partitioner matches them to the same
dynamically quantised linear (int8 per channel, or 4-bit blocks). The integers and scales are
torchao's own, so the program computes exactly what it did before; XNNPACK chooses each token's
activation scale at run time either way.
"""

from __future__ import annotations

import torch
from torch import nn


class DynamicQuantLinear(nn.Module):
    """y = x W^T + b with x int8 per token at run time and W symmetric integers (int8, or int4 held in
    int8) with one scale per output channel or per ``group`` input columns of it."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 8) -> None:
        super().__init__()
        rows, cols = qdata.shape
        scale = scale.detach().float().reshape(rows, -1)
        self.group = cols // scale.shape[1]
        self.quant_min, self.quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.register_buffer("weight_int", qdata.detach().to(torch.int8).contiguous())
        self.register_buffer("weight_scale", (scale.reshape(rows) if self.group == cols else scale).contiguous())
        self.register_buffer("weight_zero_point", torch.zeros(self.weight_scale.shape, dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero_point = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        quantised = ops.quantize_per_token(x, scale, zero_point, -128, 127, torch.int8)
        x = ops.dequantize_per_token(quantised, scale, zero_point, -128, 127, torch.int8, x.dtype)
        if self.group == self.weight_int.shape[1]:
            weight = ops.dequantize_per_channel(self.weight_int, self.weight_scale, self.weight_zero_point, 0,
                                                self.quant_min, self.quant_max, torch.int8, out_dtype=x.dtype)
        else:
            weight = ops.dequantize_per_channel_group(self.weight_int, self.weight_scale, self.weight_zero_point,
                                                      self.quant_min, self.quant_max, torch.int8, self.group, x.dtype)
        return nn.functional.linear(x, weight, self.bias)


def _integers_and_scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(integers, scales, bits) of a torchao int8/int4 symmetric weight, per output channel or in groups
    along the input, whose activations are int8 per token; None for anything else."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    if not isinstance(weight, IntxUnpackedToInt8Tensor) or weight.target_dtype not in (torch.int8, torch.int4):
        return None
    cols = weight.qdata.shape[1]
    block_rows, group = weight.block_size
    if (block_rows != 1 or cols % group
            or weight.activation_quantization != IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
            or bool(weight.zero_point.ne(0).any())):
        return None
    return weight.qdata, weight.scale, 8 if weight.target_dtype == torch.int8 else 4


def retrace_friendly(module: nn.Module) -> int:
    """Swap every torchao linear with int8 per-token activations in ``module`` (int8 weights per channel,
    or int4/int8 in groups) for DynamicQuantLinear, in place; returns how many were swapped. Float linears stay as they are."""
    swapped = 0
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        found = _integers_and_scales(layer.weight)
        if found is None:
            continue
        qdata, scale, bits = found
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, DynamicQuantLinear(qdata, scale, layer.bias, bits))
        swapped += 1
    return swapped
