"""Target runtimes: an artifact passes only on every runtime its target's devices run."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from exporter.errors import TargetError
from exporter.pipeline import export
from exporter.runtimes import RUNTIMES, environments_root, python_of
from exporter.sources import load_model
from exporter.targets import load_target, load_target_file
from tests.conftest import write_target

CNN = f"{Path(__file__).parent}/models.py:build_depthwise_cnn"

PER_CHANNEL_AND_PER_TENSOR = """
description = "a board running tflite-runtime 2.14"
runtimes = ["tflite-runtime-2.14"]
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.99
[[artifact]]
format = "tflite"
quant = "int8-dynamic-tensor"
[artifact.parity]
min_cosine = 0.99
"""


@pytest.fixture(scope="module")
def cnn_on_old_runtime(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("runtimes")
    target = load_target_file(write_target(root, "old-runtime", PER_CHANNEL_AND_PER_TENSOR))
    summary = export(target, load_model(CNN), root / "dist")
    data = json.loads((summary.folder / "manifest.json").read_text())
    return {"root": root, "target": target, "by_name": {a["name"]: a for a in data["artifacts"]}}


def test_per_channel_dynamic_range_fails_on_tflite_runtime_2_14_naming_it(cnn_on_old_runtime: dict) -> None:
    record = cnn_on_old_runtime["by_name"]["litert-int8-dynamic"]
    assert record["parity"]["passed"]  # LiteRT 2.3 on the host computes it right
    old = record["runtimes"]["tflite-runtime-2.14"]
    assert old["versions"] == {"tflite_runtime": "2.14.0"} and not old["passed"]
    assert old["metrics"]["cosine"] < 0.9  # one scale for every output channel
    assert record["status"] == "failed"
    assert record["failures"] == [f"on tflite-runtime-2.14: min_cosine {old['metrics']['cosine']:.4g} (needs 0.99)"]


def test_per_tensor_dynamic_range_agrees_on_both_runtimes(cnn_on_old_runtime: dict) -> None:
    record = cnn_on_old_runtime["by_name"]["litert-int8-dynamic-tensor"]
    assert record["status"] == "passed"
    assert record["quantisation"]["quantised_layers"] == 1  # the classifier: the convolutions stay float
    assert record["runtimes"]["tflite-runtime-2.14"]["metrics"]["cosine"] > 0.9999


def test_a_reused_artifact_is_rejudged_on_every_runtime(cnn_on_old_runtime: dict) -> None:
    root = cnn_on_old_runtime["root"]
    lenient = PER_CHANNEL_AND_PER_TENSOR.replace("min_cosine = 0.99\n", "min_cosine = 0.4\n", 1)
    target = load_target_file(write_target(root, "old-runtime", lenient))
    summary = export(target, load_model(CNN), root / "dist")
    record = next(r.record for r in summary.results if r.spec.name == "litert-int8-dynamic")
    assert record["status"] == "passed" and record["runtimes"]["tflite-runtime-2.14"]["passed"]


def test_raspberry_pi_artifacts_pass_on_the_runtimes_its_boards_run(tmp_path: Path) -> None:
    target = load_target("raspberry-pi")
    assert {a.format.value: a.runtimes for a in target.artifacts} == {
        "tflite": ("tflite-runtime-2.14",), "pte": ("executorch-1.5",)}
    summary = export(target, load_model(CNN), tmp_path / "dist")
    assert all(r.status == "passed" for r in summary.results), [r.record.get("failures") for r in summary.results]
    tflite = next(r.record for r in summary.results if r.spec.format.value == "tflite")
    assert tflite["runtimes"]["tflite-runtime-2.14"]["passed"]


def test_the_host_runtimes_are_the_versions_the_exporter_runs() -> None:
    assert metadata.version("executorch").startswith("1.5.")
    assert metadata.version("ai-edge-litert").startswith("2.3.")
    assert not RUNTIMES["executorch-1.5"].requirements and not RUNTIMES["ai-edge-litert-2.3"].requirements


def test_an_unfinished_environment_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_RUNTIMES", str(tmp_path / "envs"))
    runtime = RUNTIMES["tflite-runtime-2.14"]
    python = python_of(runtime)
    assert python.exists() and environments_root() == tmp_path / "envs"
    (python.parent.parent / ".edgeship-installed").unlink()  # as if pip was interrupted
    assert python_of(runtime) == python and (python.parent.parent / ".edgeship-installed").exists()
    left = sorted(p.name for p in (tmp_path / "envs").iterdir() if not p.name.endswith(".lock"))  # the build lock stays
    assert left == ["tflite-runtime-2.14"]  # nothing half-built left


@pytest.mark.parametrize("runtimes, message", [
    ('["tflite-runtime-2.41"]', "runtime 'tflite-runtime-2.41' is not one of"),
    ('["coreml"]', "runtime 'coreml' runs .mlpackage, and this target has no such artifact"),
    ('["executorch-1.5", "executorch-1.5"]', "lists a runtime twice"),
    ('[3]', "runtimes must be a list of runtime names"),
])
def test_bad_runtimes_are_refused_with_the_fix(tmp_path: Path, runtimes: str, message: str) -> None:
    text = f'runtimes = {runtimes}\n[[artifact]]\nformat = "pte"\nquant = "fp32"\n[artifact.parity]\nmin_cosine = 0.99\n'
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_target_file(write_target(tmp_path, "bad", text))


def test_every_shipped_target_names_a_runtime_for_each_of_its_artifacts() -> None:
    from exporter.targets import known_targets

    for name in known_targets():
        for spec in load_target(name).artifacts:
            assert spec.runtimes, f"{name}: {spec.filename} names no runtime its devices run"
