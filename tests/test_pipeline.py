"""The pipeline's promises: reuse unchanged work, fail one artifact without losing the others,
never leave a half-written artifact that looks finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.pipeline import export
from exporter.sources import load_model
from exporter.targets import load_target_file
from tests.conftest import MLP, ROOT, TESTS, write_target

TWO = """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.999
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
"""


def test_rerun_reuses_unchanged_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.progress import Progress

    target = load_target_file(write_target(tmp_path, "two", TWO))
    first = export(target, load_model(MLP), tmp_path / "dist")
    files = [first.folder / r.spec.filename for r in first.results]
    stamps = [path.stat().st_mtime_ns for path in files]
    capsys.readouterr()
    second = export(target, load_model(MLP), tmp_path / "dist", progress=Progress())
    said = capsys.readouterr().err
    assert [r.record["key"] for r in second.results] == [r.record["key"] for r in first.results]
    assert [path.stat().st_mtime_ns for path in files] == stamps  # none rewritten
    assert [r.status for r in second.results] == [r.status for r in first.results] == ["passed", "passed"]
    for path in files:
        assert f"{path.name}: unchanged since the last export, reused (passed)" in said
    assert not [line for line in said.splitlines() if line.endswith(" ...")]  # no stage ran: nothing built or measured


def test_an_artifact_another_target_built_is_copied_not_rebuilt(tmp_path: Path) -> None:
    first = export(load_target_file(write_target(tmp_path, "two", TWO)), load_model(MLP), tmp_path / "dist")
    # a second target sharing the .tflite (same spec) and with a .pte of its own
    other = TWO.replace('quant = "int8-dynamic"', 'quant = "8da4w"\ngroup_size = 32').replace("0.9999", "0.99999")
    second = export(load_target_file(write_target(tmp_path, "other", other)), load_model(MLP), tmp_path / "dist")
    by_name = {r.record["name"]: r.record for r in second.results}
    copied = by_name["litert-fp32"]
    assert copied["copied_from_target"] == "two" and "copied_from_target" not in by_name["xnnpack-8da4w"]
    assert copied["sha256"] == {r.record["name"]: r.record for r in first.results}["litert-fp32"]["sha256"]
    assert (second.folder / "litert-fp32.tflite").read_bytes() == (first.folder / "litert-fp32.tflite").read_bytes()
    assert copied["thresholds"]["min_cosine"] == 0.99999  # judged against this target's own thresholds
    # a tampered file in another target is never copied
    (first.folder / "litert-fp32.tflite").write_bytes(b"garbage")
    third = export(load_target_file(write_target(tmp_path, "third", TWO)), load_model(MLP), tmp_path / "dist")
    copies = {r.record["name"]: r.record.get("copied_from_target") for r in third.results}
    assert copies == {"xnnpack-int8-dynamic": "two", "litert-fp32": "other"}  # the intact copy, not the tampered
    assert (third.folder / "litert-fp32.tflite").read_bytes() == (second.folder / "litert-fp32.tflite").read_bytes()
    assert third.ok


def test_changing_one_artifact_rebuilds_only_that_one(tmp_path: Path) -> None:
    export(load_target_file(write_target(tmp_path, "two", TWO)), load_model(MLP), tmp_path / "dist")
    folder = tmp_path / "dist" / "two" / "mlp"
    tflite_stamp = (folder / "litert-fp32.tflite").stat().st_mtime_ns
    changed = TWO.replace('quant = "int8-dynamic"', 'quant = "8da4w"\ngroup_size = 32')
    summary = export(load_target_file(write_target(tmp_path, "two", changed)), load_model(MLP), tmp_path / "dist")
    assert (folder / "litert-fp32.tflite").stat().st_mtime_ns == tflite_stamp
    assert (folder / "xnnpack-8da4w.pte").is_file()
    assert summary.ok


def test_a_tampered_artifact_is_rebuilt(tmp_path: Path) -> None:
    target = load_target_file(write_target(tmp_path, "two", TWO))
    first = export(target, load_model(MLP), tmp_path / "dist")
    tflite = first.folder / "litert-fp32.tflite"
    tflite.write_bytes(b"garbage")
    second = export(target, load_model(MLP), tmp_path / "dist")
    assert second.ok and tflite.read_bytes() != b"garbage"


def test_an_op_one_backend_cannot_lower_fails_that_artifact_only(tmp_path: Path) -> None:
    float_pte = TWO.replace('quant = "int8-dynamic"', 'quant = "fp32"')
    target = load_target_file(write_target(tmp_path, "two", float_pte))
    summary = export(target, load_model(f"{TESTS}/models.py:build_spectral"), tmp_path / "dist")
    by_name = {r.spec.name: r for r in summary.results}
    assert by_name["xnnpack-fp32"].status == "error"
    assert "xnnpack-fp32.pte: ExecuTorch could not lower the model" in by_name["xnnpack-fp32"].record["error"]
    assert by_name["litert-fp32"].status == "passed"
    assert not (summary.folder / "xnnpack-fp32.pte").exists()
    assert not list(summary.folder.glob(".staging-*"))
    assert not summary.ok


def test_parity_failure_names_artifact_metric_measured_and_required(tmp_path: Path) -> None:
    strict = TWO.replace("min_cosine = 0.999\n", "min_cosine = 0.999\nmax_abs_error = 1e-9\n", 1)
    summary = export(load_target_file(write_target(tmp_path, "strict", strict)), load_model(MLP), tmp_path / "dist")
    failed = summary.results[0]
    assert failed.status == "failed"
    assert failed.record["failures"][0].startswith("max_abs_error ")
    assert "(required <= 1e-09)" in failed.record["failures"][0]
    assert summary.results[1].status == "passed"


def test_killed_export_leaves_nothing_that_looks_finished_and_rerun_completes(tmp_path: Path) -> None:
    target = write_target(tmp_path, "two", TWO)
    command = [sys.executable, "-m", "exporter", "export", "--target", str(target), "--model", MLP,
               "--output", str(tmp_path / "dist")]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    for line in process.stderr:  # kill it while the first artifact is being lowered
        if "xnnpack-int8-dynamic.pte: xnnpack" in line:
            time.sleep(0.5)
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    folder = tmp_path / "dist" / "two" / "mlp"
    assert not (folder / "manifest.json").exists()
    assert not (folder / "xnnpack-int8-dynamic.pte").exists()
    summary = export(load_target_file(target), load_model(MLP), tmp_path / "dist")
    assert summary.ok
    assert not list(folder.glob(".staging-*"))
    assert json.loads((folder / "manifest.json").read_text())["artifacts"][0]["status"] == "passed"


def test_only_selects_formats(tmp_path: Path) -> None:
    target = load_target_file(write_target(tmp_path, "two", TWO))
    summary = export(target, load_model(MLP), tmp_path / "dist", only=("tflite",))
    assert [r.spec.name for r in summary.results] == ["litert-fp32"]


def test_only_matching_nothing_is_an_error(tmp_path: Path) -> None:
    from exporter.errors import ExportError

    target = load_target_file(write_target(tmp_path, "two", TWO))
    with pytest.raises(ExportError, match="--only onnx matches no artifact"):
        export(target, load_model(MLP), tmp_path / "dist", only=("onnx",))


def test_a_changed_threshold_rejudges_stored_metrics_without_rebuilding(tmp_path: Path) -> None:
    first = export(load_target_file(write_target(tmp_path, "two", TWO)), load_model(MLP), tmp_path / "dist")
    pte = first.folder / "xnnpack-int8-dynamic.pte"
    stamp = pte.stat().st_mtime_ns
    stricter = TWO.replace("min_cosine = 0.999\n", "min_cosine = 0.999\nmax_abs_error = 1e-9\n", 1)
    second = export(load_target_file(write_target(tmp_path, "two", stricter)), load_model(MLP), tmp_path / "dist")
    assert pte.stat().st_mtime_ns == stamp
    assert second.results[0].status == "failed"
    assert second.results[0].record["failures"][0].startswith("max_abs_error ")
    assert second.results[0].record["thresholds"]["max_abs_error"] == 1e-9
