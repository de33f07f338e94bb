"""One decode step (T=1) of SmolLM2-135M's linears alone, in the formulations XNNPACK can run, lowered
and timed in ExecuTorch: how much do 4-bit weights save, and what does carrying Q4_1 blocks cost?
Random weights of the real shapes (576 hidden, 192 k/v, 1536 MLP, 49152-row lm_head); engines are timed
in alternation, medians of 3 rounds of 200 steps. Usage (about 10 minutes for 30 layers):

    .venv/bin/python bench/linear_formulations.py [LAYERS]

Measured here, 30 layers (docs/measurements.md "Decode step: where the time goes"): int8 per channel 6.0 ms, 8da4w with an
int8 lm_head 4.4 ms, carried Q4_1 blocks 6.5 ms, carried with q/k/v and gate/up fused 5.75 ms.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from exporter import llm
from exporter.quant import library_config
from exporter.sources.gguf_blocks import Blocks

HIDDEN, KV, MLP, VOCAB = 576, 192, 1536, 49152


def random_blocks(rows: int, cols: int) -> Blocks:
    return Blocks(torch.rand(rows, cols // 32) * 0.01, torch.randn(rows, cols // 32) * 0.01,
                  torch.randint(-8, 8, (rows, cols), dtype=torch.int8))


class Layer(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:  # one matmul per input: q/k/v share the attention input, gate/up the MLP input
            self.qkv = nn.Linear(HIDDEN, HIDDEN + 2 * KV, bias=False)
            self.gate_up = nn.Linear(HIDDEN, 2 * MLP, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(HIDDEN, n, bias=False) for n in (HIDDEN, KV, KV))
            self.gate, self.up = nn.Linear(HIDDEN, MLP, bias=False), nn.Linear(HIDDEN, MLP, bias=False)
        self.o, self.down = nn.Linear(HIDDEN + 2 * KV, HIDDEN, bias=False), nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.qkv(x) if self.fused else torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        x = x + self.o(attention)
        if self.fused:
            both = self.gate_up(x)
            gate, up = both[..., :MLP], both[..., MLP:]
        else:
            gate, up = self.gate(x), self.up(x)
        return x + self.down(nn.functional.silu(gate) * up)


class Stack(nn.Module):
    def __init__(self, layers: int, fused: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(fused) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(variant: str, layers: int, folder: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import quantize_

    model = Stack(layers, fused="fused" in variant).eval()
    head_only = lambda module, name: name == "head"  # noqa: E731
    body_only = lambda module, name: isinstance(module, nn.Linear) and name != "head"  # noqa: E731
    if variant == "int8":
        quantize_(model, library_config("pte", "int8-dynamic", None))
    else:
        quantize_(model, library_config("pte", "int8-dynamic", None), filter_fn=head_only)
        if variant.startswith("8da4w"):
            quantize_(model, library_config("pte", "8da4w", 32), filter_fn=body_only)
        else:
            names = [n for n, m in model.named_modules() if body_only(m, n)]
            llm.carry_blocks(model, {n: random_blocks(*model.get_submodule(n).weight.shape) for n in names})
    sample = torch.randn(1, 4, HIDDEN)
    program = torch.export.export(model, (sample,), dynamic_shapes=({1: torch.export.Dim("t", min=1, max=255)},),
                                  strict=False)
    buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    path = folder / f"{variant}.pte"
    path.write_bytes(buffer)
    return path


def step_ms(path: Path, steps: int = 200) -> float:
    from executorch.runtime import Runtime

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


def main(layers: int) -> None:
    variants = ("int8", "8da4w", "8da4w_fused", "carried", "carried_fused")
    with tempfile.TemporaryDirectory() as folder:
        paths = {v: build(v, layers, Path(folder)) for v in variants}
        timings: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(3):
            for variant in variants:
                timings[variant].append(step_ms(paths[variant]))
        for variant in variants:
            size = paths[variant].stat().st_size / 1e6
            print(f"{variant:14} {statistics.median(timings[variant]):6.2f} ms/step  {size:5.0f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
