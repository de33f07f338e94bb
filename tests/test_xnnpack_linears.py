"""torchao's int8-dynamic linears re-expressed with quantized_decomposed ops: same program, faster tracing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.formats import pte
from exporter.formats.xnnpack_linears import DynamicInt8Linear, retrace_friendly
from exporter.targets import load_target_file
from tests.conftest import write_target
from tests.models import build_mlp


def _spec(folder: Path, quant: str, group: str = ""):
    target = load_target_file(write_target(folder, quant, f"""
[[artifact]]
format = "pte"
quant = "{quant}"
{group}
[artifact.parity]
min_cosine = 0.9
"""))
    return target.artifacts[0]


def _graph_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def test_swapped_program_computes_exactly_what_torchao_s_program_computes(tmp_path: Path) -> None:
    model, inputs = build_mlp()
    spec = _spec(tmp_path, "int8-dynamic")
    quantised, _ = pte.quantise(model.eval(), spec)
    programs = {"torchao": torch.export.export(quantised, inputs, strict=False)}
    swapped = retrace_friendly(quantised)
    assert swapped == 5  # every linear of the Mlp: per-channel int8 takes any width
    assert all(isinstance(m, DynamicInt8Linear) for m in (quantised.embed, quantised.block[0], quantised.odd))
    programs["swapped"] = torch.export.export(quantised, inputs, strict=False)
    assert not any("torchao" in op for op in _graph_ops(programs["swapped"]))
    assert any("torchao" in op for op in _graph_ops(programs["torchao"]))  # the test compares two different graphs

    outputs = {}
    for name, program in programs.items():
        buffer, details = pte.lower(program, spec)
        assert not any("linear" in op or "mm" in op for op in details["non_delegated_ops"]), details
        path = tmp_path / f"{name}.pte"
        path.write_bytes(buffer)
        outputs[name] = pte.load(path)([inputs[0].numpy()])[0]
    # XNNPACK gets the same integers, scales and dynamic-quantisation pattern: bit-identical results.
    np.testing.assert_array_equal(outputs["swapped"], outputs["torchao"])
    eager = model(*inputs).detach().numpy()
    assert np.abs(outputs["swapped"] - eager).max() < 0.05 * np.abs(eager).max()


def test_grouped_four_bit_linears_are_left_to_torchao(tmp_path: Path) -> None:
    model, _ = build_mlp()
    quantised, plan = pte.quantise(model.eval(), _spec(tmp_path, "8da4w", "group_size = 32"))
    assert any(d.quantised for d in plan)
    assert retrace_friendly(quantised) == 0
    assert not any(isinstance(m, DynamicInt8Linear) for m in quantised.modules())


def test_eager_forward_matches_torchao_s_eager_forward(tmp_path: Path) -> None:
    model, inputs = build_mlp()
    quantised, _ = pte.quantise(model.eval(), _spec(tmp_path, "int8-dynamic"))
    expected = quantised(*inputs)
    retrace_friendly(quantised)
    torch.testing.assert_close(quantised(*inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_int8_linear_is_the_dequantised_weight_times_the_quantised_input(bias: bool) -> None:
    torch.manual_seed(0)
    q = torch.randint(-128, 128, (6, 16), dtype=torch.int8)
    scale = torch.rand(6) * 0.01 + 0.001
    b = torch.randn(6) if bias else None
    x = torch.randn(3, 16)
    layer = DynamicInt8Linear(q, scale, b)
    reference = torch.nn.functional.linear(x, q.float() * scale[:, None], b)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0.02 * reference.abs().max().item())
