"""The Python API: `from exporter import export, load_target`, as a notebook user writes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporter import EdgeshipError, export, known_targets, load_target
from tests.conftest import MLP
from tests.models import build_depthwise_cnn


def test_a_model_object_exports_and_the_summary_is_data(tmp_path: Path) -> None:
    module, inputs = build_depthwise_cnn()
    summary = export(module, "raspberry-pi", tmp_path / "dist", inputs=inputs, name="my-cnn")
    assert summary.ok and summary.folder == tmp_path / "dist" / "raspberry-pi" / "my-cnn"
    by_file = {r.spec.filename: r for r in summary.results}
    assert set(by_file) == {"litert-int8-dynamic-tensor.tflite", "xnnpack-int8-dynamic.pte"}
    pte = by_file["xnnpack-int8-dynamic.pte"].record
    assert pte["status"] == "passed" and pte["parity"]["metrics"]["cosine"] > 0.99
    assert (summary.folder / pte["file"]).stat().st_size == pte["size"]
    assert by_file["litert-int8-dynamic-tensor.tflite"].record["runtimes"]["tflite-runtime-2.14"]["passed"]
    module.classifier.weight.data += 1  # a changed model is exported again, never reused
    again = export(module, load_target("raspberry-pi"), tmp_path / "dist", inputs=inputs, name="my-cnn", only=("pte",))
    assert again.results[0].record["sha256"] != pte["sha256"]


def test_a_source_path_exports_like_the_cli(tmp_path: Path) -> None:
    summary = export(MLP, "linux-x86_64", tmp_path / "dist", only=("tflite",))
    assert summary.ok and [r.spec.filename for r in summary.results] == ["litert-fp32.tflite"]
    assert summary.folder.name == "mlp" and "linux-x86_64" in known_targets()


def test_errors_are_the_clis_with_their_fix(tmp_path: Path) -> None:
    module, inputs = build_depthwise_cnn()
    with pytest.raises(EdgeshipError, match="needs its sample inputs and a name"):
        export(module, "android", tmp_path)
    with pytest.raises(EdgeshipError, match="name '../up' names the export's folder"):
        export(module, "android", tmp_path, inputs=inputs, name="../up")
    with pytest.raises(EdgeshipError, match="unknown target 'andriod' \\(did you mean 'android'\\?\\)"):
        export(module, "andriod", tmp_path, inputs=inputs, name="cnn")
    with pytest.raises(EdgeshipError, match="missing/model.py: no such file"):
        export("missing/model.py:build", "android", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written by a refused call


def test_importing_the_package_does_not_load_the_toolchain() -> None:
    code = "import sys, exporter; print('torch' in sys.modules, callable(exporter.load_target))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    assert torch  # the tests themselves use it


def test_the_readmes_example_runs_as_written(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "True dist/raspberry-pi/my-mlp" in done.stdout and "xnnpack-int8-dynamic.pte passed" in done.stdout
