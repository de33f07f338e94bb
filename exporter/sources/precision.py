"""A language model held in its checkpoint's 16-bit dtype and computed in fp32.

Most checkpoints store bf16 (or fp16) weights. Held as such, the reference model takes half the memory of
fp32 (2.5 instead of 4.9 GB for a 1.2B model, 7.6 instead of 15.3 GB for a 3.8B one) while it waits
and while its weights are parked; every computation that edgeship compares against (the eager reference,
calibration, smoothing, quantisation) still runs on fp32 tensors, upcast from the 16-bit values exactly,
so its results are those of the same checkpoint loaded in fp32, to the bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def held_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype to hold a checkpoint's weights in: its own when that is bf16 or fp16 (``dtype``, or
    ``torch_dtype`` in older configs), else fp32."""
    stored = config.get("dtype") or config.get("torch_dtype")
    return SIXTEEN_BIT.get(str(stored).removeprefix("torch."), torch.float32)


def _low_precision(tensor: torch.Tensor) -> bool:
    return tensor.dtype in SIXTEEN_BIT.values()


def fp32_buffers(model: nn.Module) -> None:
    """Give the model the fp32 values of the buffers it computes from its config rather than reads from the
    checkpoint (non-persistent ones): loaded in bf16 they were rounded where fp32 loading keeps them exact
    (Gemma 3's embedding scale, sqrt(hidden_size): 25.25 instead of 25.298 at hidden size 640)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    stored = set(model.state_dict())
    rounded = [name for name, buffer in model.named_buffers() if _low_precision(buffer) and name not in stored]
    if not rounded:
        return
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no weight is made
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    exact = dict(skeleton.named_buffers())
    for name in rounded:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, exact[name].clone(), persistent=False)


def upcast(model: nn.Module) -> nn.Module:
    """Every 16-bit parameter and buffer of ``model`` in fp32, one tensor at a time (each 16-bit tensor is let
    go as its fp32 copy is made, so the model never exists in both); tied parameters stay one object."""
    for tensor in _tensors(model):
        if _low_precision(tensor):
            tensor.data = tensor.data.float()
    return model


@contextmanager
def computing_in_fp32(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model's 16-bit tensors are fp32 (the upcast is exact); on leaving they are their own dtype
    again, the same values, whatever happened inside."""
    dtypes = [(tensor, tensor.dtype) for tensor in _tensors(model) if _low_precision(tensor)]
    try:
        upcast(model)
        yield model
    finally:
        for tensor, dtype in dtypes:
            tensor.data = tensor.data.to(dtype)


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()  # each tied parameter once
    yield from model.buffers()
