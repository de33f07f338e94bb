"""The rewrites that keep a language model's shape ops inside XNNPACK's partitions compute what they replace."""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch

from exporter.formats.xnnpack_shapes import DelegableShapes
from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target
from tests.conftest import make_tiny_lm


class HeadsAndNorm(torch.nn.Module):
    """The shape ops of a Llama layer: a RMSNorm's mean, a reshape to heads, RoPE's halves, an unsqueeze."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        heads = x.view(1, x.shape[1], -1, 8).transpose(1, 2)  # HF's way: the head count inferred
        rotated = torch.cat((-heads[..., 4:], heads[..., :4]), dim=-1)
        out = heads * cos.unsqueeze(1) + rotated
        return out.transpose(1, 2).reshape(1, x.shape[1], 32)


def _export(module: torch.nn.Module, mode: DelegableShapes | None) -> torch.export.ExportedProgram:
    sample = (torch.randn(1, 5, 32), torch.randn(1, 5, 8))
    seq = torch.export.Dim("seq", min=1, max=64)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.export.export(module, sample, dynamic_shapes=({1: seq}, {1: seq}), strict=False)


def _ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def test_the_rewritten_program_computes_what_the_model_does() -> None:
    module = HeadsAndNorm()
    plain = _export(module, None)
    rewritten = _export(module, DelegableShapes(module, {32}, {8}))
    assert {"aten.mean.dim", "aten.slice.Tensor", "aten.unsqueeze.default"} <= _ops(plain)
    assert not {"aten.mean.dim", "aten.slice.Tensor", "aten.unsqueeze.default"} & _ops(rewritten)
    # every reshape left has at most one size to infer and none symbolic: XNNPACK's static reshape
    for node in rewritten.graph.nodes:
        if node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            assert all(isinstance(s, int) for s in node.args[1]), node.args[1]
    for length in (1, 7, 40):
        x, cos = torch.randn(1, length, 32), torch.randn(1, length, 8)
        want = module(x, cos)
        got = rewritten.module()(x, cos)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the mean sums in another order


def test_a_slice_or_mean_with_no_weight_made_for_it_is_left_as_it_is() -> None:
    module = HeadsAndNorm()
    rewritten = _export(module, DelegableShapes(module, set(), set()))
    assert {"aten.mean.dim", "aten.slice.Tensor"} <= _ops(rewritten)
    x, cos = torch.randn(1, 9, 32), torch.randn(1, 9, 8)
    torch.testing.assert_close(rewritten.module()(x, cos), module(x, cos), rtol=0, atol=0)


def test_a_language_models_pte_keeps_only_the_cache_ops_outside_xnnpack(tmp_path: Path,
                                                                        smollm2_tokenizer_folder: Path) -> None:
    folder = make_tiny_lm(tmp_path / "tiny-llama", "llama", smollm2_tokenizer_folder)
    summary = export(load_target("android"), load_model(str(folder), SourceOptions(context_len=64)), tmp_path / "dist",
                     only=("pte",))
    details = summary.results[0].record["details"]
    layers = 2
    outside = details["non_delegated_ops"]
    assert not {"aten.mean.dim", "aten.slice_copy.Tensor"} & set(outside), outside
    # RoPE's table once, and the last token's hidden state once, not once per layer
    assert outside.get("aten.unsqueeze_copy.default", 0) <= 1 and outside.get("aten.view_copy.default", 0) <= 1, outside
    # Each layer: its projections and RoPE before the cache updates, the output projection and MLP after
    # custom SDPA (the first layer's norm and projections join the embedding's part); before, the means,
    # slices and reshapes split each layer into five to six partitions (13 calls for these two layers).
    assert details["delegate_calls"] <= 2 * layers + 1, details
