"""A GGUF's own 4-bit blocks, kept instead of quantising its dequantised weights a second time.

A Q4_1 block stores 32 weights as ``scale * q + minimum`` with q in 0..15 and a float scale and minimum
per block. Re-centred, that is ``scale * (q - 8) + offset`` with ``offset = minimum + 8 * scale``:
a symmetric int4 block (what XNNPACK's 4-bit kernels run) plus one float offset per block. The offsets
contribute ``sum_b offset[n, b] * sum(x[block b])``, a matmul 32 times smaller than the layer.
Carried this way the artifact holds exactly the GGUF's weights; re-quantising the dequantised
weights to torchao's int4 blocks measured 0.64 next-token agreement on SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

GROUP = 32
_Q4_1_BLOCK_BYTES = 20  # fp16 scale, fp16 minimum, 16 bytes of packed nibbles


@dataclass
class Blocks:
    """A [N, K] weight as W[n, 32b:32b+32] = scale[n, b] * q[n, 32b:32b+32] + offset[n, b]."""

    scale: torch.Tensor  # [N, K/32] float32
    offset: torch.Tensor  # [N, K/32] float32
    q: torch.Tensor  # [N, K] int8 in -8..7

    def dequantised(self) -> torch.Tensor:
        n, k = self.q.shape
        grouped = self.q.float().reshape(n, k // GROUP, GROUP)
        return (grouped * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)).reshape(n, k)

    def scale_rows(self, factors: torch.Tensor) -> None:
        """Multiply output row n by factors[n] (a producer's part of smoothing): still exact blocks."""
        self.scale.mul_(factors.unsqueeze(1))
        self.offset.mul_(factors.unsqueeze(1))

    def scale_columns(self, factors: torch.Tensor) -> None:
        """Multiply input column j by factors[j], which must be constant within each block of 32."""
        per_block = factors.reshape(-1, GROUP)
        if not torch.equal(per_block, per_block[:, :1].expand_as(per_block)):
            raise ValueError("column factors of a carried 4-bit layer must be constant within each block of 32")
        self.scale.mul_(per_block[:, 0].unsqueeze(0))
        self.offset.mul_(per_block[:, 0].unsqueeze(0))


def _unpack_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[Blocks, np.ndarray]:
    """The blocks, and the weight dequantised exactly as gguf-py (and so transformers) computes it."""
    blocks = raw.reshape(-1).view(np.uint8).reshape(rows, cols // GROUP, _Q4_1_BLOCK_BYTES)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    # The low nibbles hold a block's first 16 weights, the high nibbles its last 16 (ggml's layout).
    q = np.concatenate([nibbles & 15, nibbles >> 4], -1).astype(np.int8)
    as_loaded = (scale[..., None] * q.astype(np.float32) + minimum[..., None]).reshape(rows, cols)
    centred = Blocks(torch.from_numpy(scale), torch.from_numpy(minimum + 8 * scale),
                     torch.from_numpy(q.reshape(rows, cols) - 8))
    return centred, as_loaded


def blocks_on_grid(weight: torch.Tensor) -> Blocks | None:
    """The Q4_1 blocks a dequantised weight came from, or None if any block of it is not on a Q4_1 grid.

    llama.cpp quantises a block with ``minimum = min(w)`` and ``scale = (max(w) - min(w)) / 15``, both
    stored as fp16, so its smallest value dequantises to the minimum itself and its largest to
    ``15 * scale + minimum``: both read back from the values. A block is accepted only if every value is
    exactly ``fp32(scale * q + minimum)`` with q in 0..15 (as gguf-py and transformers compute it), so a
    float checkpoint never passes by accident. This is how a HF folder saved from a Q4_1 GGUF (fp32, or
    bf16/fp16 where the values survive) gets the same carried artifact as the GGUF itself.
    """
    rows, cols = weight.shape
    if cols % GROUP:
        return None
    if rows > 1 and blocks_on_grid(weight[:1]) is None:  # a float checkpoint fails on its first row already:
        return None  # reading a 1.2B model's every weight to find out took 23 s
    values = weight.detach().float().numpy().reshape(rows, cols // GROUP, GROUP)
    low, high = values.min(-1), values.max(-1)
    minimum = low.astype(np.float16).astype(np.float32)
    scale = ((high - low) / 15).astype(np.float16).astype(np.float32)
    if not (np.array_equal(minimum, low) and np.isfinite(scale).all()):
        return None
    step = np.where(scale > 0, scale, 1)[..., None]
    q = np.clip(np.rint((values - minimum[..., None]) / step), 0, 15)
    if not np.array_equal((scale[..., None] * q + minimum[..., None]).astype(np.float32), values):
        return None
    return Blocks(torch.from_numpy(scale.copy()), torch.from_numpy(minimum + 8 * scale),
                  torch.from_numpy(q.astype(np.int8).reshape(rows, cols) - 8))


def blocks_in_model(model: nn.Module) -> dict[str, Blocks]:
    """Q4_1 blocks of every linear of a model whose weights are a dequantised Q4_1 GGUF (see blocks_on_grid)."""
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and layer.weight.dim() == 2:
            blocks = blocks_on_grid(layer.weight)
            if blocks is not None:
                found[name] = blocks
    return found


def _layer_index(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    return parts[1] if parts[0] == "blk" and len(parts) > 2 else None


def _row_order(as_loaded: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """The permutation taking GGUF rows to the loaded model's rows (llama.cpp reorders the query and
    key rows for its RoPE), or None when the weights differ: then the blocks are not carried."""
    if np.array_equal(as_loaded, weight):
        return np.arange(weight.shape[0])
    rows = {row.tobytes(): i for i, row in enumerate(as_loaded)}
    order = [rows.get(row.tobytes()) for row in weight]
    if any(i is None for i in order) or len(set(order)) != len(order):
        return None
    return np.array(order)


def read_blocks(path: Path, model: nn.Module) -> dict[str, Blocks]:
    """Q4_1 blocks of ``path``, keyed by the name of the linear in ``model`` (loaded from that file)
    that they reproduce. A tensor is matched only when its blocks give back that linear's weight."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    linears = {name: layer for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    found: dict[str, Blocks] = {}
    for tensor in reader.tensors:
        index = _layer_index(tensor.name)
        if tensor.tensor_type.name != "Q4_1" or index is None or len(tensor.shape) != 2:
            continue
        cols, rows = int(tensor.shape[0]), int(tensor.shape[1])  # GGUF lists the fastest dimension first
        if cols % GROUP:
            continue
        blocks, as_loaded = _unpack_q4_1(np.asarray(tensor.data), rows, cols)
        for name, layer in linears.items():
            if name in found or f".{index}." not in f".{name}." or tuple(layer.weight.shape) != (rows, cols):
                continue
            order = _row_order(as_loaded, layer.weight.detach().numpy())
            if order is not None:
                rows_t = torch.from_numpy(order)
                found[name] = Blocks(blocks.scale[rows_t].clone(), blocks.offset[rows_t].clone(), blocks.q[rows_t].clone())
                break
    return found
