"""A GGUF's Q4_1 linears as one symmetric 4-bit matmul per shared input, on XNNPACK's 8da4w kernel.

A Q4_1 block is ``W = s * q + o`` (``sources.gguf_blocks``: q in -8..7, a float offset o per block of
32), so ``W x = sum_b s_b q_b . x_b + sum_b o_b * sum(x_b)``. The second sum is a matmul on the block
means of x, 32 times narrower than the layer. Appending ``c * means`` to x makes both one matmul:

    y = [x, c * means(x)] . [s * q | 32 * o / c]^T

The extra columns hold the offsets as DIGITS int4 digits, each group of 32 columns with its own bf16
scale per row, 15 times finer than the one before (two digits: about 8 bits per offset). The means enter
scaled by a power of two c, measured on calibration text so that they stay inside the activation's int8
range; every input column is quantised per token by XNNPACK as usual. Linears that read the same input
(q/k/v, gate/up) become one matmul over their stacked rows, whose output each of them slices.

Against carrying the blocks as three matmuls (4-bit blocks, int8 block sums, float offsets) this reads
fewer bytes (int4 digits instead of float offsets) and runs one kernel per input instead of three per
linear (bench/decode_formulations.py); the offsets lose a little precision (bench/carried_faithfulness.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sources.gguf_blocks import GROUP, Blocks
from .xnnpack_linears import DynamicQuantLinear

DIGITS = 2
_SMALLEST_SCALE = 2.0 ** -40  # XNNPACK wants every block scale normal and positive


def _bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).float()


def _padded(count: int) -> int:
    return -(-count // GROUP) * GROUP


def offset_digits(offsets: torch.Tensor, digits: int = DIGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets [rows, n] as ``digits`` int4 groups: (integers [rows, digits * pad(n)], scales [rows, digits *
    pad(n) / 32]), where group d holds the digit of scale scales[:, d] (bf16, 15x finer each time) and the
    padding columns are zero. sum_d digit_d * scale_d reproduces the offsets to ~1/(7 * 15^(digits-1))
    of each row's largest."""
    rows, count = offsets.shape
    width = _padded(count)
    integers = torch.zeros(rows, digits * width, dtype=torch.int8)
    scales = torch.empty(rows, digits * width // GROUP)
    scale = _bf16((offsets.abs().amax(1, keepdim=True) / 7).clamp(min=_SMALLEST_SCALE))
    residual = offsets.clone()
    for d in range(digits):
        digit = torch.clamp(torch.round(residual / scale), -8, 7)
        integers[:, d * width:d * width + count] = digit.to(torch.int8)
        scales[:, d * width // GROUP:(d + 1) * width // GROUP] = scale
        residual = residual - digit * scale
        scale = _bf16((scale / 15).clamp(min=_SMALLEST_SCALE))
    return integers, scales


class AugmentedLinear(nn.Module):
    """Stacked Q4_1 linears that read one input x [..., K]: y = [x, c * means(x)] . W^T, one 4-bit matmul."""

    def __init__(self, blocks: list[Blocks], biases: list[torch.Tensor | None], mean_factor: float) -> None:
        super().__init__()
        cols = blocks[0].q.shape[1]
        self.blocks_per_row = cols // GROUP
        offsets = torch.cat([b.offset for b in blocks]) * GROUP / mean_factor
        tail, tail_scales = offset_digits(offsets)
        qdata = torch.cat([torch.cat([b.q for b in blocks]), tail], 1)
        body_scales = _bf16(torch.cat([b.scale for b in blocks]).clamp(min=_SMALLEST_SCALE))  # a constant block has 0
        scales = torch.cat([body_scales, tail_scales], 1)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(blk.q.shape[0]) for b, blk in zip(biases, blocks)])
        self.matmul = DynamicQuantLinear(qdata, scales, bias, bits=4)
        self.mean = nn.Linear(GROUP, 1, bias=False)  # c / 32: exact for a power of two c
        self.mean.weight.data.fill_(mean_factor / GROUP)
        width = _padded(self.blocks_per_row)
        spread = torch.zeros(DIGITS * width, self.blocks_per_row)  # each mean into its column of every digit group
        for d in range(DIGITS):
            spread[d * width + torch.arange(self.blocks_per_row), torch.arange(self.blocks_per_row)] = 1
        self.spread = nn.Linear(self.blocks_per_row, DIGITS * width, bias=False)
        self.spread.weight.data.copy_(spread)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reshapes with static sizes and one inferred dimension: XNNPACK takes them, so the means, the
        # concatenation and the matmul stay in one delegate.
        means = self.mean(x.reshape(-1, GROUP))
        means = means.reshape(x.shape[0], -1, self.blocks_per_row) if x.dim() == 3 else means.reshape(-1, self.blocks_per_row)
        return self.matmul(torch.cat([x, self.spread(means)], -1))


class _Shared(nn.Module):
    """The stacked matmul of linears that read one input, computed once per input and handed out in slices."""

    def __init__(self, linear: AugmentedLinear, members: int) -> None:
        super().__init__()
        self.linear = linear
        self.members = members
        self._input: Any = None
        self._output: Any = None
        self._served: set[int] = set()

    def slice_for(self, x: torch.Tensor, member: int, start: int, end: int) -> torch.Tensor:
        if x is not self._input or member in self._served:
            self._input, self._output, self._served = x, self.linear(x), set()
        out = self._output[..., start:end]
        self._served.add(member)
        if len(self._served) == self.members:  # every member has its slice: hold no tensor past this step
            self._input = self._output = None
            self._served = set()
        return out


class SharedInputMember(nn.Module):
    """Stands where one of the linears was: its rows of the shared matmul. Only the first member owns the
    shared matmul as a submodule; the others reach it unregistered, so its weights have one name, and
    torch.export lifts them once (aliased names leave a second, unused copy in the program)."""

    def __init__(self, shared: _Shared, member: int, start: int, end: int) -> None:
        super().__init__()
        if member == 0:
            self.shared = shared
        else:
            object.__setattr__(self, "shared", shared)
        self.member, self.start, self.end = member, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.slice_for(x, self.member, self.start, self.end)


def shared_inputs(model: nn.Module, names: list[str], run: Any) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Which of the named linears read the very same tensor (in model order), and each one's inputs, seen
    while ``run()`` runs the model once."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen.setdefault(name, args[0])
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in names:
        if name not in seen:
            continue
        home = next((g for g in groups if seen[g[0]] is seen[name]), None)
        if home is None:
            groups.append([name])
        else:
            home.append(name)
    return groups, seen


def mean_factor(x: torch.Tensor) -> float:
    """The largest power of two c with c * max|block mean| <= max|x| for 99% of the tokens of x: the
    scaled means then rarely widen the per-token int8 range that x sets."""
    tokens = x.detach().reshape(-1, x.shape[-1]).float()
    means = tokens.reshape(tokens.shape[0], -1, GROUP).mean(-1)
    ratio = tokens.abs().amax(-1) / means.abs().amax(-1).clamp(min=1e-12)
    return float(2.0 ** torch.floor(torch.log2(torch.quantile(ratio, 0.01))).clamp(0, 10))


def carry(model: nn.Module, carried: dict[str, Blocks], run: Any) -> dict[str, str]:
    """Swap the named linears of ``model`` for their share of one AugmentedLinear per shared input (found
    by ``run()``, one forward of calibration text). Returns, per linear, what its layer report says."""
    groups, inputs = shared_inputs(model, list(carried), run)
    report = {}
    for group in groups:
        linears = [model.get_submodule(name) for name in group]
        factor = mean_factor(inputs[group[0]])
        shared = _Shared(AugmentedLinear([carried[n] for n in group], [layer.bias for layer in linears], factor),
                         len(group))
        start = 0
        for member, (name, linear) in enumerate(zip(group, linears)):
            rows = linear.weight.shape[0]
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute,
                    SharedInputMember(shared, member, start, start + rows))
            start += rows
            together = f", one matmul with {', '.join(n.rsplit('.', 1)[-1] for n in group)}" if len(group) > 1 else ""
            report[name] = (f"int4 groups of 32 carried exactly from the GGUF's Q4_1 blocks, offsets as {DIGITS} "
                            f"int4 digits on the block means (x{factor:g}){together}")
    return report
