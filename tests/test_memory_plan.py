"""An export's peak memory is estimated before the heavy work: side by side when that fits, one artifact
at a time when only that fits, refused (exit 2, nothing built) when nothing does."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter import memory_plan
from exporter.errors import ExportError
from exporter.memory_plan import GIB, estimated_peak, plan

MODEL = 5 * GIB  # a 1.2B model's fp32 bytes
FLOAT_PTE = """
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
"""


def test_the_estimate_grows_with_the_model_and_is_lower_one_artifact_at_a_time() -> None:
    assert estimated_peak(MODEL, True) > estimated_peak(MODEL, False) > estimated_peak(MODEL // 10, False)
    assert estimated_peak(2 * MODEL, True) - estimated_peak(MODEL, True) == pytest.approx(
        memory_plan.PER_FP32_BYTE["parallel"] * MODEL, rel=1e-6)


# Measured whole-tree peaks (docs/measurements.md "Export cost against model size"), the highest of the
# runs measured: fp32 GiB of the model, side by side, one artifact at a time (None: not measured).
MEASURED = [(0.50, 4.90, 3.50), (1.35, 6.47, None), (1.84, 7.40, None), (4.60, 11.31, 9.85), (14.23, None, 21.56)]


@pytest.mark.parametrize("fp32_gib,side_by_side,one_at_a_time", MEASURED)
def test_the_estimate_is_at_or_above_every_measured_peak(fp32_gib: float, side_by_side: float | None,
                                                          one_at_a_time: float | None) -> None:
    if side_by_side is not None:
        assert estimated_peak(int(fp32_gib * GIB), True) >= side_by_side * GIB
    if one_at_a_time is not None:
        assert estimated_peak(int(fp32_gib * GIB), False) >= one_at_a_time * GIB


def test_a_model_measured_to_fit_is_not_refused() -> None:
    """Phi-3-mini's shape (14.2 GiB in fp32) exported one artifact at a time at 21.56 GiB on a machine with
    about 22.5 GiB available: the estimate must let it try."""
    assert estimated_peak(int(14.23 * GIB), False) <= 22.5 * GIB


def test_side_by_side_when_it_fits_or_when_nothing_can_be_known() -> None:
    assert plan(MODEL, True, True, 64 * GIB).parallel and plan(MODEL, True, True, 64 * GIB).note is None
    assert plan(MODEL, True, True, None).parallel
    assert not plan(MODEL, False, True, 64 * GIB).parallel  # --sequential stays sequential


def test_one_artifact_at_a_time_when_only_that_fits_and_the_user_is_told() -> None:
    available = (estimated_peak(MODEL, True) + estimated_peak(MODEL, False)) // 2
    chosen = plan(MODEL, True, True, available)
    assert not chosen.parallel and chosen.estimated_bytes == estimated_peak(MODEL, False)
    assert "one artifact at a time" in chosen.note and "GiB available" in chosen.note
    assert plan(MODEL, True, False, available).parallel  # no litert-torch child: nothing runs side by side


def test_an_export_that_cannot_fit_is_refused_with_the_numbers_and_the_way_out() -> None:
    with pytest.raises(ExportError) as refused:
        plan(MODEL, True, True, 4 * GIB)
    message = str(refused.value)
    assert f"{estimated_peak(MODEL, False) / GIB:.1f} GiB" in message and "4.0 GiB is available" in message
    assert "--no-memory-check" in message


def test_the_export_is_refused_before_the_reference_and_goes_on_when_told_to_ignore_the_estimate(
        tmp_path: Path, smollm2_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.pipeline import export
    from exporter.sources import SourceOptions, load_model
    from exporter.targets import load_target_file
    from tests.conftest import make_tiny_lm, write_target

    model = load_model(str(make_tiny_lm(tmp_path / "lm", "llama", smollm2_tokenizer_folder)), SourceOptions(context_len=32))
    target = load_target_file(write_target(tmp_path, "float", FLOAT_PTE))
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: GIB // 2)
    with pytest.raises(ExportError, match="--no-memory-check"):
        export(target, model, tmp_path / "dist")
    assert not (tmp_path / "dist" / "float" / model.name / "golden.npz").exists()  # no heavy work began
    with pytest.raises(ExportError, match="--context-len 32 is too short for the parity check's prompts"):
        export(target, model, tmp_path / "dist", memory_check=False)  # past the memory check: the next one


def test_a_checkpoint_too_large_for_memory_is_refused_before_it_is_loaded(
        tmp_path: Path, smollm2_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading alone holds a model in fp32 (19 GiB for a 3.8B checkpoint): the parameter count is read
    from the safetensors headers, and an export that cannot fit even one artifact at a time stops there."""
    import argparse

    from exporter.commands import export_command
    from tests.conftest import make_tiny_lm

    folder = make_tiny_lm(tmp_path / "lm", "llama", smollm2_tokenizer_folder)
    count = memory_plan.parameters_on_disk(str(folder))
    assert count == sum(p.numel() for p in load_model_weights(folder))
    loads = []
    monkeypatch.setattr("exporter.sources.load_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: int(estimated_peak(4 * count, False)) - 1)
    args = argparse.Namespace(target="android", model=str(folder), no_memory_check=False, quiet=True, seq_len=None,
                              batch_size=None, context_len=None, only="", output=str(tmp_path), sequential=False)
    with pytest.raises(ExportError, match="even one artifact at a time"):
        export_command(args)
    assert not loads


def load_model_weights(folder: Path) -> list:
    from safetensors.torch import load_file

    return [t for f in folder.glob("*.safetensors") for t in load_file(str(f)).values()]
