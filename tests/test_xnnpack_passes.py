"""XNNPACK's preprocessing without the passes that have nothing to rewrite: the same program, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.formats import pte, xnnpack_passes
from tests.conftest import pte_spec
from tests.models import build_depthwise_cnn, build_mlp


def _as_executorch_lowers_it(program: torch.export.ExportedProgram, spec) -> bytes:
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=pte.partitioners(spec),
                                       compile_config=EdgeCompileConfig(_check_ir_validity=True))
    return edge.to_executorch().buffer


@pytest.mark.parametrize(("build", "quant", "group", "must_run"), [
    (build_mlp, "8da4w", "group_size = 32", {"FuseActivationPass"}),  # a ReLU after a linear
    (build_depthwise_cnn, "fp32", "", {"FuseBatchNormPass", "FuseActivationPass", "Conv1dUnsqueezePass"}),
])
def test_skipping_the_passes_with_nothing_to_rewrite_lowers_the_same_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build, quant: str, group: str, must_run: set[str]
) -> None:
    model, inputs = build()
    spec = pte_spec(tmp_path, quant, group)
    quantised, _ = pte.quantise(model.eval(), spec)
    program = torch.export.export(quantised, inputs, strict=False)
    expected = _as_executorch_lowers_it(program, spec)

    decided: dict[str, set[bool]] = {}
    judge = xnnpack_passes.has_work

    def recorded(pass_: type, graph) -> bool:
        decided.setdefault(pass_.__name__, set()).add(answer := judge(pass_, graph))
        return answer

    monkeypatch.setattr(xnnpack_passes, "has_work", recorded)
    pte.lower(program, spec, tmp_path / "skipping.pte")
    assert (tmp_path / "skipping.pte").read_bytes() == expected
    skipped = {name for name, answers in decided.items() if answers == {False}}
    assert {"PReLUReshapePass", "RemoveGetItemPass", "ConvertToSDPAPass"} <= skipped  # the skipping happened
    assert must_run <= {name for name, answers in decided.items() if True in answers}


def test_every_pass_named_is_one_xnnpack_runs_and_every_pattern_holds_its_op() -> None:
    """An ExecuTorch that renames or drops a pass, or changes a pattern, fails here rather than skipping wrongly."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    runs = {p.__name__ for p in XNNPACKPassManager(None).passes}  # the default list
    assert set(xnnpack_passes.rewritten_ops()) <= runs
    for name, patterns in (("ConvertToSDPAPass", sdpa.get_graphs()), ("ConvertToUpsampleBilinear2d", bilinear_2d.get_graphs())):
        assert patterns
        for pattern in patterns:
            assert xnnpack_passes.ops_in(pattern.graph) & xnnpack_passes.rewritten_ops()[name], name
