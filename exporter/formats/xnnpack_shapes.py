"""Ops a language model's graph leaves outside XNNPACK, written while tracing as ops XNNPACK takes.

XNNPACK's partitioner refuses an op whose shape is symbolic: the reshapes to and from attention heads
(the prompt length is dynamic), RoPE's halves of each head (slices of a dynamic-length tensor), the
unsqueezes of its cos/sin tables, and every RMSNorm's mean over the hidden size (it takes means only
over the two innermost dimensions of a 4-D tensor). Each refused op runs in ExecuTorch's portable
kernels and splits the delegate around it: android's .pte of SmolLM2-135M had 153 delegate calls for
30 layers, and ExecuTorch's lowering time grows with the number of partitions. Written here:

- a reshape with one symbolic size as the same reshape with -1 there (XNNPACK infers one size; a -1
  the model wrote is worked out from the static sizes first);
- an unsqueeze of a tensor with one symbolic size as that reshape;
- a slice of the last (static) dimension as a linear layer selecting those columns (a 0/1 matrix:
  exactly the same values);
- a mean over the last dimension as a linear layer with one row of 1/n (the same sum, in another order).

What stays outside is what XNNPACK has no kernel for: the KV-cache updates and custom SDPA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_MEANS = {torch.Tensor.mean, torch.mean}
_UNSQUEEZES = {torch.Tensor.unsqueeze, torch.unsqueeze}


class DelegableShapes(TorchFunctionMode):
    """Active around ``torch.export.export`` of ``owner``, a decoder whose program XNNPACK lowers. The
    linears' constant weights are registered on ``owner`` as buffers before tracing (a tensor made during
    the trace would be traced as an op, and one lifted as a constant breaks ExecuTorch's delegate calls):
    a row of 1/n for each width in ``mean_widths`` and the two halves of each width in ``halved_widths``
    (RoPE's rotate_half), plus the (start, stop, width) column ranges in ``slices``. A mean or slice with
    no weight made for it stays as it is."""

    def __init__(self, owner: torch.nn.Module, mean_widths: set[int], halved_widths: set[int],
                 slices: set[tuple[int, int, int]] = frozenset()) -> None:
        super().__init__()
        self._owner = owner
        self._names: dict[tuple[Any, ...], str] = {}
        ranges = set(slices) | {r for w in halved_widths if w % 2 == 0 for r in ((0, w // 2, w), (w // 2, w, w))}
        for width in sorted(mean_widths):
            self._register(owner, ("mean", width), torch.full((1, width), 1.0 / width))
        for start, stop, width in sorted(ranges):
            weight = torch.zeros(stop - start, width)
            weight[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            self._register(owner, ("select", width, start, stop), weight)

    def _register(self, owner: torch.nn.Module, key: tuple[Any, ...], weight: torch.Tensor) -> None:
        name = "delegable_" + "_".join(str(k) for k in key)
        if not hasattr(owner, name):
            owner.register_buffer(name, weight, persistent=False)
        self._names[key] = name

    def _weight(self, key: tuple[Any, ...]) -> torch.Tensor | None:
        """Read from the owner at each use: torch.export swaps its buffers for the traced ones."""
        return getattr(self._owner, self._names[key]) if key in self._names else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rewritten = self._rewrite(func, args, kwargs)
        return rewritten if rewritten is not None else func(*args, **kwargs)

    def _rewrite(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not _one_symbolic_size(x.shape):
            return None
        if func in _RESHAPES:
            shape = _static_but_one(x, _shape_argument(args[1:], kwargs))
            return None if shape is None else x.reshape(shape)
        if func in _UNSQUEEZES:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if not isinstance(dim, int):
                return None
            dim = dim if dim >= 0 else dim + x.dim() + 1
            sizes = list(x.shape)
            sizes.insert(dim, 1)
            return x.reshape([s if isinstance(s, int) else -1 for s in sizes])
        if func is torch.Tensor.__getitem__ and x.is_floating_point():
            columns = _last_dimension_slice(args[1], x)
            if columns is None:
                return None
            weight = self._weight(("select", int(x.shape[-1]), *columns))
            return None if weight is None or x.dtype != weight.dtype else torch.nn.functional.linear(x, weight)
        if func in _MEANS and x.is_floating_point():
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if dim not in (-1, [-1], (-1,), x.dim() - 1, [x.dim() - 1], (x.dim() - 1,)) or not keep or kwargs.get("dtype"):
                return None
            weight = self._weight(("mean", int(x.shape[-1])))
            return None if weight is None or x.dtype != weight.dtype else torch.nn.functional.linear(x, weight)
        return None


def for_decoder(owner: torch.nn.Module, config: Any) -> DelegableShapes:
    """The rewrites for a HF decoder's config: means over the hidden size and the head size (RMSNorm, and
    Qwen3's norms of each head), RoPE's halves of the rotated part of each head and, where only part of
    a head is rotated (Phi-2, GPT-NeoX), the rotated and the passed-through parts."""
    hidden = int(config.hidden_size)
    head = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    fraction = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 1.0
    rotated = int(head * fraction)
    parts = {(0, rotated, head), (rotated, head, head)} if 0 < rotated < head else set()
    return DelegableShapes(owner, {hidden, head}, {head, rotated}, parts)


def _static_but_one(x: torch.Tensor, shape: list[Any] | None) -> list[int] | None:
    """``shape`` with its one symbolic size written -1, the size XNNPACK infers. A -1 already there (as in
    HF's ``view(1, seq, -1, head_dim)``) is worked out first, from the sizes of ``x`` that are static:
    the symbolic size must then be the same as x's."""
    if shape is None or sum(not isinstance(s, int) for s in shape) != 1:
        return None
    symbolic = next(s for s in shape if not isinstance(s, int))
    if -1 in [s for s in shape if isinstance(s, int)]:
        if str(symbolic) != str(next(s for s in x.shape if not isinstance(s, int))):
            return None
        known = math.prod(s for s in x.shape if isinstance(s, int))
        kept = math.prod(s for s in shape if isinstance(s, int) and s != -1)
        if kept == 0 or known % kept:
            return None
        shape = [known // kept if isinstance(s, int) and s == -1 else s for s in shape]
    return [s if isinstance(s, int) else -1 for s in shape]


def _one_symbolic_size(shape: torch.Size) -> bool:
    return sum(not isinstance(s, int) for s in shape) == 1


def _shape_argument(rest: tuple, kwargs: dict) -> list[Any] | None:
    shape = kwargs.get("shape", kwargs.get("size"))
    if shape is None:
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)) else rest
    shape = list(shape)
    return shape if shape and all(isinstance(s, (int, torch.SymInt)) for s in shape) else None


def _last_dimension_slice(index: Any, x: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) of ``x[..., start:stop]`` with a static last dimension, else None."""
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
        return None
    width = x.shape[-1]
    if not isinstance(width, int) or index[1].step not in (None, 1):
        return None
    start, stop, _ = index[1].indices(width)
    return (start, stop) if 0 <= start < stop <= width and (start, stop) != (0, width) else None
