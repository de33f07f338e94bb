"""A GGUF's Q4_1 linears as one symmetric 4-bit matmul each, on XNNPACK's 8da4w kernel.

A Q4_1 block is ``W = s * q + o`` (``sources.gguf_blocks``: q in -8..7, a float offset o per block of
32), so ``W x = sum_b s_b q_b . x_b + sum_b o_b * sum(x_b)``. The second sum is a matmul on the block
means of x, 32 times narrower than the layer. Appending ``c * means`` to x makes both one matmul:

    y = [x, c * means(x)] . [s * q | 32 * o / c]^T

The extra columns hold the offsets as DIGITS int4 digits, each group of 32 columns with its own bf16
scale per row, 15 times finer than the one before (two digits: about 8 bits per offset). The means enter
scaled by a power of two c, measured on calibration text so that they stay inside the activation's int8
range; every input column is quantised per token by XNNPACK as usual. Linears that read the same input
(q/k/v, gate/up) share its augmented input, computed once; each keeps its own matmul, since slicing a
stacked matmul's output (dynamic length) is not delegated and would split the program's delegates.

Against carrying the blocks as three matmuls (4-bit blocks, int8 block sums, float offsets) this reads
fewer bytes (int4 digits instead of float offsets) and runs one kernel per linear instead of three
(bench/decode_formulations.py); the offsets lose a little precision (bench/carried_faithfulness.py).
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


class BlockMeans(nn.Module):
    """x [..., K] -> [x, c * means(x)] with each block's mean in its column of every digit group: the
    input every carried linear reading x multiplies. Computed once per input tensor and handed to each of
    the ``readers`` linears that read it (q/k/v, gate/up), so the means are not recomputed per linear."""

    def __init__(self, cols: int, mean_factor: float, readers: int = 1) -> None:
        super().__init__()
        self.blocks_per_row = cols // GROUP
        self.mean = nn.Linear(GROUP, 1, bias=False)  # c / 32: exact for a power of two c
        self.mean.weight.data.fill_(mean_factor / GROUP)
        width = _padded(self.blocks_per_row)
        spread = torch.zeros(DIGITS * width, self.blocks_per_row)
        for d in range(DIGITS):
            spread[d * width + torch.arange(self.blocks_per_row), torch.arange(self.blocks_per_row)] = 1
        self.spread = nn.Linear(self.blocks_per_row, DIGITS * width, bias=False)
        self.spread.weight.data.copy_(spread)
        self.requires_grad_(False)
        self.factor = mean_factor
        self.readers = readers
        self._input: Any = None
        self._output: Any = None
        self._served: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reshapes with static sizes and one inferred dimension: XNNPACK takes them, so the means, the
        # concatenation and the matmuls that read them stay in one delegate.
        means = self.mean(x.reshape(-1, GROUP))
        means = means.reshape(x.shape[0], -1, self.blocks_per_row) if x.dim() == 3 else means.reshape(-1, self.blocks_per_row)
        return torch.cat([x, self.spread(means)], -1)

    def for_reader(self, x: torch.Tensor, reader: int) -> torch.Tensor:
        if x is not self._input or reader in self._served:
            self._input, self._output, self._served = x, self(x), set()
        out = self._output
        self._served.add(reader)
        if len(self._served) == self.readers:  # every reader has it: hold no tensor past this step
            self._input = self._output = None
            self._served = set()
        return out


def augmented_weight(blocks: Blocks, mean_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 integers, bf16 scales per group of 32) of ``[s * q | 32 * o / c]``: the Q4_1 blocks, then the
    offsets as int4 digits for the block-mean columns BlockMeans appends."""
    tail, tail_scales = offset_digits(blocks.offset * GROUP / mean_factor)
    body_scales = _bf16(blocks.scale.clamp(min=_SMALLEST_SCALE))  # a constant block has scale 0
    return torch.cat([blocks.q, tail], 1), torch.cat([body_scales, tail_scales], 1)


class CarriedLinear(nn.Module):
    """One Q4_1 linear as one 4-bit matmul on its input's BlockMeans. The first reader of an input owns
    the BlockMeans as a submodule; the others reach it unregistered, so its weights have one name (torch.export
    would otherwise keep a second, unused copy)."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, means: BlockMeans, reader: int = 0) -> None:
        super().__init__()
        qdata, scales = augmented_weight(blocks, means.factor)
        self.matmul = DynamicQuantLinear(qdata, scales, bias, bits=4)
        if reader == 0:
            self.means = means
        else:
            object.__setattr__(self, "means", means)
        self.reader = reader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(self.means.for_reader(x, self.reader))


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
    """Swap the named linears of ``model`` for CarriedLinears, one BlockMeans per shared input (found by
    ``run()``, one forward of calibration text). Returns, per linear, what its layer report says."""
    groups, inputs = shared_inputs(model, list(carried), run)
    report = {}
    for group in groups:
        factor = mean_factor(inputs[group[0]])
        means = BlockMeans(carried[group[0]].q.shape[1], factor, readers=len(group))
        for reader, name in enumerate(group):
            linear = model.get_submodule(name)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute,
                    CarriedLinear(carried[name], linear.bias, means, reader))
            others = [n.rsplit(".", 1)[-1] for n in group if n != name]
            shared = f", block means shared with {', '.join(others)}" if others else ""
            report[name] = (f"int4 groups of 32 carried exactly from the GGUF's Q4_1 blocks, offsets as {DIGITS} "
                            f"int4 digits on the block means (x{factor:g}){shared}")
    return report
