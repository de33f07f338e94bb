"""torchao's int8-dynamic linears re-expressed with quantized_decomposed ops: same program, faster tracing."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.formats import pte
from exporter.formats.xnnpack_linears import DynamicQuantLinear, retrace_friendly
from tests.conftest import pte_spec
from tests.models import build_mlp


def _graph_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize(("quant", "group", "swapped"), [("int8-dynamic", "", 5), ("8da4w", "group_size = 32", 4)])
def test_swapped_program_computes_exactly_what_torchao_s_program_computes(
    tmp_path: Path, quant: str, group: str, swapped: int
) -> None:
    model, inputs = build_mlp()
    spec = pte_spec(tmp_path, quant, group)
    quantised, plan = pte.quantise(model.eval(), spec)
    programs = {"torchao": torch.export.export(quantised, inputs, strict=False)}
    # int8 per channel takes every width; 4-bit groups of 32 leave the 10-wide layer float
    assert retrace_friendly(quantised) == swapped == sum(d.quantised for d in plan)
    assert isinstance(quantised.embed, DynamicQuantLinear) and isinstance(quantised.block[0], DynamicQuantLinear)
    programs["swapped"] = torch.export.export(quantised, inputs, strict=False)
    assert not any("torchao" in op for op in _graph_ops(programs["swapped"]))
    assert any("torchao" in op for op in _graph_ops(programs["torchao"]))  # the test compares two different graphs

    outputs = {}
    for name, program in programs.items():
        path = tmp_path / f"{name}.pte"
        details, _ = pte.lower(program, spec, path)
        assert not any("linear" in op or "mm" in op for op in details["non_delegated_ops"]), details
        outputs[name] = pte.load(path)([inputs[0].numpy()])[0]
    # XNNPACK gets the same integers, scales and dynamic-quantisation pattern: bit-identical results.
    np.testing.assert_array_equal(outputs["swapped"], outputs["torchao"])
    eager = model(*inputs).detach().numpy()
    assert np.abs(outputs["swapped"] - eager).max() < 0.1 * np.abs(eager).max()


def test_float_linears_are_left_as_they_are() -> None:
    model, _ = build_mlp()
    assert retrace_friendly(model) == 0
    assert not any(isinstance(m, DynamicQuantLinear) for m in model.modules())


@pytest.mark.parametrize(("quant", "group"), [("int8-dynamic", ""), ("8da4w", "group_size = 32")])
def test_eager_forward_matches_torchao_s_eager_forward(tmp_path: Path, quant: str, group: str) -> None:
    model, inputs = build_mlp()
    quantised, _ = pte.quantise(model.eval(), pte_spec(tmp_path, quant, group))
    expected = quantised(*inputs)
    retrace_friendly(quantised)
    torch.testing.assert_close(quantised(*inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "groups", "bias"), [(8, 1, True), (8, 1, False), (4, 2, True), (8, 4, False)])
def test_dynamic_quant_linear_is_the_dequantised_weight_times_the_quantised_input(bits: int, groups: int, bias: bool) -> None:
    torch.manual_seed(0)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 16), dtype=torch.int8)
    scale = torch.rand(6, groups) * 0.01 + 0.001
    b = torch.randn(6) if bias else None
    x = torch.randn(3, 16)
    layer = DynamicQuantLinear(q, scale, b, bits)
    weight = q.float() * scale.repeat_interleave(16 // groups, dim=1)
    reference = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0.02 * reference.abs().max().item())


def test_a_lowering_leaves_none_of_its_graphs_alive(tmp_path: Path) -> None:
    """ExecuTorch's partitioner caches and loggers keep the last lowering's graphs (with their fake tensors)
    reachable from module globals: 0.2 GiB the default model's export carried into the .tflite build."""
    model, inputs = build_mlp()
    spec = pte_spec(tmp_path, "int8-dynamic")
    quantised, _ = pte.quantise(model.eval(), spec)
    retrace_friendly(quantised)
    pte.lower(torch.export.export(quantised, inputs, strict=False), spec, tmp_path / "warm.pte")  # lazy pattern graphs
    gc.collect()
    existing = [g for g in gc.get_objects() if isinstance(g, torch.fx.Graph)]  # held, so their ids stay unique
    known = {id(g) for g in existing}
    pte.lower(torch.export.export(quantised, inputs, strict=False), spec, tmp_path / "model.pte")
    gc.collect()
    left = [len(g.nodes) for g in gc.get_objects() if isinstance(g, torch.fx.Graph) and id(g) not in known]
    assert left == [], f"graphs of the lowering still alive (nodes each): {left}"


@pytest.mark.parametrize(("quant", "group"), [("int8-dynamic", ""), ("8da4w", "group_size = 32")])
def test_a_large_weight_quantised_in_row_blocks_is_the_weight_torchao_makes_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str, group: str
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 320), torch.nn.Linear(320, 8))  # 320 rows: blocks 128, 128, 64
    spec = pte_spec(tmp_path, quant, group)
    whole, _ = pte.quantise(model, spec)
    blocks = []
    monkeypatch.setattr(pte, "ROW_BLOCK_ELEMENTS", 64 * 128)
    original = pte._quantise_in_row_blocks
    monkeypatch.setattr(pte, "_quantise_in_row_blocks", lambda layer, config: (blocks.append(layer), original(layer, config)))
    in_blocks, plan = pte.quantise(model, spec)
    assert blocks == [in_blocks[0]] and all(d.quantised for d in plan)  # only the large one, in blocks
    for joined, made_whole in zip(in_blocks, whole):
        assert type(joined.weight) is type(made_whole.weight) and joined.weight.shape == made_whole.weight.shape
        for name in made_whole.weight.tensor_data_names:
            torch.testing.assert_close(getattr(joined.weight, name), getattr(made_whole.weight, name), rtol=0, atol=0)
    assert retrace_friendly(in_blocks) == 2
    x = torch.randn(3, 64)
    torch.testing.assert_close(in_blocks(x), whole(x), rtol=0, atol=0)
