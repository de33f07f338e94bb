"""torchao's int8-dynamic linears re-expressed with ``quantized_decomposed`` ops, which trace fast.

torchao writes its quantised linears with ``choose_qparams_affine`` / ``quantize_affine`` /
``dequantize_affine``, ops that are CompositeImplicitAutograd: every pass of ExecuTorch's lowering
re-traces the graph with fake tensors and decomposes all of them again in Python, a third of the
.pte build of a language model (py-spy, session 6). ``quantized_decomposed``'s per-token and
per-channel ops carry meta kernels, and XNNPACK's partitioner matches them to the same dynamically
quantised linear. The integers and scales are torchao's own, so the program computes exactly what
it did before; XNNPACK chooses each token's activation scale at run time either way.
"""

from __future__ import annotations

import torch
from torch import nn


class DynamicInt8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel (symmetric) and x int8 per token at run time."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_int8", qdata.detach().to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("weight_zero_point", torch.zeros(qdata.shape[0], dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero_point = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        quantised = ops.quantize_per_token(x, scale, zero_point, -128, 127, torch.int8)
        x = ops.dequantize_per_token(quantised, scale, zero_point, -128, 127, torch.int8, x.dtype)
        weight = ops.dequantize_per_channel(self.weight_int8, self.weight_scale, self.weight_zero_point,
                                            0, -128, 127, torch.int8, out_dtype=x.dtype)
        return nn.functional.linear(x, weight, self.bias)


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(integers, scales) of a torchao int8 per-output-channel weight with per-token activations."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    if not isinstance(weight, IntxUnpackedToInt8Tensor):
        return None
    rows, cols = weight.qdata.shape
    if (weight.target_dtype != torch.int8 or tuple(weight.block_size) != (1, cols)
            or weight.activation_quantization != IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
            or bool(weight.zero_point.ne(0).any())):
        return None
    return weight.qdata, weight.scale.reshape(rows)


def retrace_friendly(module: nn.Module) -> int:
    """Swap every torchao int8-dynamic per-channel linear in ``module`` for DynamicInt8Linear (in place);
    returns how many were swapped. Other linears (float, grouped 4-bit) stay as they are."""
    swapped = 0
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        found = _per_channel_int8(layer.weight)
        if found is None:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, DynamicInt8Linear(*found, layer.bias))
        swapped += 1
    return swapped
