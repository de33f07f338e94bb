"""One decode step (T=1) of SmolLM2-135M's linears and lm_head in the formulations XNNPACK can run,
lowered and timed in ExecuTorch side by side: which one is as fast as every linear at 4 bits while
carrying a GGUF's Q4_1 blocks exactly? Random weights of the real shapes (576 hidden, 192 k/v, 1536 MLP,
49,152-row lm_head); engines timed in alternation, medians of ROUNDS rounds of 300 steps. Usage:

    .venv/bin/python bench/decode_formulations.py [LAYERS] [VARIANT ...]

A variant is BODY/FUSION/HEAD:
- BODY ``int8``: int8 per-channel linears (the android target); ``8da4w``: symmetric int4 blocks of 32 (what
  other exporters ship); ``carried``: Q4_1 blocks as 4-bit matmul + block sums + float offsets per linear
  (the android target); ``augmented``: one 4-bit matmul on [x, c * block means of x] whose extra
  columns hold the offsets as two int4 digits;
- FUSION ``none``, ``qkv`` (q/k/v one matmul) or ``all`` (q/k/v and gate/up);
- HEAD ``int8``, ``int4`` or ``2stage`` (a 4-bit scan, topk 64 candidates rescored with their int8 rows).
Each layer has RMSNorms and a stand-in for attention computed outside XNNPACK, as the real decoder does,
so the delegate is split where it is split in a real program.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.formats.carried_linears import BlockMeans
from exporter.formats.carried_linears import CarriedLinear as OneMatmulLinear
from exporter.formats.pte import delegation
from exporter.formats.xnnpack_linears import DynamicQuantLinear, retrace_friendly
from exporter.quant import library_config
from exporter.sources.gguf_blocks import GROUP, Blocks

HIDDEN, KV, MLP, VOCAB = 576, 192, 1536, 49152
ROUNDS = 3
CANDIDATES = 64


def _dynamic_int_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> nn.Parameter:
    """A torchao weight given by its integers and scales (no re-quantisation): int8 dynamic
    per-token activations, symmetric int{bits} weights in blocks of ``group`` along the input."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    tensor = IntxUnpackedToInt8Tensor(
        qdata=q.to(torch.int8), scale=scale.float(), zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=getattr(torch, f"int{bits}"), block_size=(1, group), dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    return nn.Parameter(tensor, requires_grad=False)


class CarriedLinear(nn.Module):
    """The three-matmul form of a carried Q4_1 linear (see ``sources.gguf_blocks``), for comparison.

    y = int4 blocks (x) + offsets(block sums of x) + bias. The int4 part runs on XNNPACK's 8da4w
    kernel (int8 dynamic activations, as for every other linear); the block sums are an int8 matmul
    with 0/1 weights (exact, and the same bytes in every layer, so the program stores them once per
    width); the offsets are a float matmul 32 times smaller than the layer.
    """

    def __init__(self, blocks: Any, bias: torch.Tensor | None) -> None:
        super().__init__()
        rows, cols = blocks.q.shape
        self.blocks = nn.Linear(cols, rows, bias=bias is not None)
        self.blocks.weight = _dynamic_int_weight(blocks.q, blocks.scale, 4, GROUP)
        if bias is not None:
            self.blocks.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        membership = torch.zeros(cols // GROUP, cols, dtype=torch.int8)
        membership[torch.arange(cols) // GROUP, torch.arange(cols)] = 1
        self.block_sums = nn.Linear(cols, cols // GROUP, bias=False)
        self.block_sums.weight = _dynamic_int_weight(membership, torch.ones(cols // GROUP, 1), 8, cols)
        self.offsets = nn.Linear(cols // GROUP, rows, bias=False)
        self.offsets.weight = nn.Parameter(blocks.offset.detach().clone().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) + self.offsets(self.block_sums(x))


def carry_blocks(model: nn.Module, carried: dict[str, Any]) -> list[str]:
    """Swap the named linears for CarriedLinear; returns the names swapped."""
    for name, blocks in carried.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attribute)
        setattr(parent, attribute, CarriedLinear(blocks, linear.bias))
    return list(carried)


def random_blocks(rows: int, cols: int) -> Blocks:
    return Blocks((torch.rand(rows, cols // GROUP) + 0.5) * 0.01, torch.randn(rows, cols // GROUP) * 0.01,
                  torch.randint(-8, 8, (rows, cols), dtype=torch.int8))


class TwoStageHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scan = DynamicQuantLinear(torch.randint(-8, 8, (VOCAB, HIDDEN), dtype=torch.int8),
                                       (torch.rand(VOCAB, HIDDEN // GROUP) + 0.5) * 0.01, None, bits=4)
        self.register_buffer("table", torch.randint(-127, 127, (VOCAB, HIDDEN), dtype=torch.int8))
        self.register_buffer("scales", (torch.rand(VOCAB) + 0.5) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

        logits = self.scan(x)  # [1, T, vocab]
        picked = logits.topk(CANDIDATES, -1).indices
        rows = torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.table, self.scales, None, -128, 127, picked, dtype=torch.float32)  # [1, T, K, hidden]
        exact = (rows @ x.unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, picked, exact)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # mean over the last dim: outside XNNPACK


class Layer(nn.Module):
    def __init__(self, body: str, fusion: str) -> None:
        super().__init__()
        self.fusion = fusion
        make = (lambda cols, rows: OneMatmulLinear(random_blocks(rows, cols), None, BlockMeans(cols, 4.0))) if body == "augmented" else \
            (lambda cols, rows: nn.Linear(cols, rows, bias=False))
        if fusion in ("qkv", "all"):
            self.qkv = make(HIDDEN, HIDDEN + 2 * KV)
        else:
            self.q, self.k, self.v = make(HIDDEN, HIDDEN), make(HIDDEN, KV), make(HIDDEN, KV)
        if fusion == "all":
            self.gate_up = make(HIDDEN, 2 * MLP)
        else:
            self.gate, self.up = make(HIDDEN, MLP), make(HIDDEN, MLP)
        self.o, self.down = make(HIDDEN, HIDDEN), make(MLP, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x)
        if self.fusion in ("qkv", "all"):
            qkv = self.qkv(h)
            q, k, v = qkv[..., :HIDDEN], qkv[..., HIDDEN:HIDDEN + KV], qkv[..., HIDDEN + KV:]
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        # attention stand-in, computed outside XNNPACK like llama::custom_sdpa
        attention = q * torch.cumsum(k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True), 1)
        x = x + self.o(attention)
        h = rms_norm(x)
        if self.fusion == "all":
            both = self.gate_up(h)
            gate, up = both[..., :MLP], both[..., MLP:]
        else:
            gate, up = self.gate(h), self.up(h)
        return x + self.down(nn.functional.silu(gate) * up)


class Stack(nn.Module):
    def __init__(self, layers: int, variant: str) -> None:
        super().__init__()
        body, fusion, head = variant.split("/")
        self.layers = nn.ModuleList(Layer(body, fusion) for _ in range(layers))
        self.head = TwoStageHead() if head == "2stage" else nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(rms_norm(x))


def build(variant: str, layers: int, folder: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torchao.quantization import quantize_

    model = Stack(layers, variant).eval().requires_grad_(False)
    body, _, head = variant.split("/")
    is_linear = lambda module, name: type(module) is nn.Linear and not name.endswith(("mean", "spread"))  # noqa: E731
    head_only = lambda module, name: name == "head" and type(module) is nn.Linear  # noqa: E731
    body_only = lambda module, name: is_linear(module, name) and name != "head"  # noqa: E731
    if head in ("int8", "int4"):
        scheme = "int8-dynamic" if head == "int8" else "8da4w"
        quantize_(model, library_config("pte", scheme, None if head == "int8" else GROUP), filter_fn=head_only)
    if body in ("int8", "8da4w"):
        quantize_(model, library_config("pte", "int8-dynamic" if body == "int8" else "8da4w",
                                        None if body == "int8" else GROUP), filter_fn=body_only)
    elif body == "carried":
        names = [n for n, m in model.named_modules() if body_only(m, n)]
        carry_blocks(model, {n: random_blocks(*model.get_submodule(n).weight.shape) for n in names})
    retrace_friendly(model)
    sample = torch.randn(1, 4, HIDDEN)
    program = torch.export.export(model, (sample,), dynamic_shapes=({1: torch.export.Dim("t", min=1, max=255)},),
                                  strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    left = delegation(edge)["non_delegated_ops"]
    print(f"{variant}: outside XNNPACK: {left}", flush=True)
    path = folder / f"{variant.replace('/', '-')}.pte"
    path.write_bytes(edge.to_executorch().buffer)
    return path


def step_ms(path: Path, steps: int = 300) -> float:
    from executorch.runtime import Runtime

    from exporter.formats.pte import load_runtime_extensions

    load_runtime_extensions()
    method = Runtime.get().load_program(str(path)).load_method("forward")
    x = torch.randn(1, 1, HIDDEN)
    for _ in range(20):
        method.execute([x])
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        method.execute([x])
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main(layers: int, variants: list[str]) -> None:
    # Built programs are kept (and reused) in one folder per layer count, so a later run only times.
    folder = Path(tempfile.gettempdir()) / f"decode_formulations-{layers}"
    folder.mkdir(exist_ok=True)
    paths = {}
    for v in variants:
        path = folder / f"{v.replace('/', '-')}.pte"
        if not path.exists():
            began = time.perf_counter()
            build(v, layers, folder)
            print(f"built {v} in {time.perf_counter() - began:.0f} s", flush=True)
        paths[v] = path
    timings: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(ROUNDS):
        for variant in variants:
            timings[variant].append(step_ms(paths[variant]))
    base = statistics.median(timings[variants[0]])
    for variant in variants:
        size = paths[variant].stat().st_size / 1e6
        median = statistics.median(timings[variant])
        print(f"{variant:22} {median:6.2f} ms/step  {base / median:5.2f}x {variants[0]}  {size:5.0f} MB", flush=True)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    main(count, sys.argv[2:] or ["int8/none/int8", "8da4w/none/int4", "carried/none/int8", "augmented/qkv/int8",
                                 "augmented/qkv/2stage", "8da4w/qkv/int8"])
