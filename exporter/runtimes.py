"""The runtimes a target's devices run, and an artifact checked on each of them that the host can run.

An export checks every artifact on the host's own runtimes (the versions this package installs). A
device may run another version, and a version can compute differently: tflite-runtime 2.14, what a
Raspberry Pi installs, applies one scale to every output channel of a dynamic-range FULLY_CONNECTED, so a
per-channel int8 .tflite that LiteRT 2.3 runs at cosine 1.0 comes out at 0.49 there (docs/measurements.md
"Target runtimes"). A target names its devices' runtimes (``runtimes = [...]``); each one that is not the
host's own gets a Python environment of its own, created on first use and reused, and runs the device
runner (device_tests/runner.py, the same code a board runs) on the artifact and the export's golden data.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError


@dataclass(frozen=True)
class Runtime:
    name: str
    formats: tuple[str, ...]  # artifact formats it runs
    # pip requirements of its own environment; empty: it is the runtime this package itself checks with
    requirements: tuple[str, ...]
    about: str


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("executorch-1.5", ("pte",), (), "ExecuTorch 1.5 (the exporter's own: Android, iOS, Linux apps)"),
    Runtime("ai-edge-litert-2.3", ("tflite",), (), "LiteRT 2.3, ai-edge-litert (the exporter's own)"),
    Runtime("coreml", ("mlpackage",), (), "Core ML on macOS/iOS (numerics checked on a Mac)"),
    Runtime("tflite-runtime-2.14", ("tflite",), ("numpy<2", "tflite-runtime==2.14.0"),
            "tflite-runtime 2.14 with NumPy 1.26, what Raspberry Pi OS and most arm64 boards install"),
)}

INSTALLED = ".edgeship-installed"  # written last into an environment: its requirements, one per line


def environments_root() -> Path:
    """Where the runtimes' environments live: $EDGESHIP_RUNTIMES, else ~/.cache/edgeship/runtimes."""
    configured = os.environ.get("EDGESHIP_RUNTIMES")
    return Path(configured) if configured else Path.home() / ".cache" / "edgeship" / "runtimes"


def python_of(runtime: Runtime) -> Path:
    """The runtime's own Python, its environment created (or repaired) first if needed."""
    folder = environments_root() / runtime.name
    python = folder / "bin" / "python"
    wanted = "\n".join(runtime.requirements) + "\n"
    stamp = folder / INSTALLED

    def finished() -> bool:
        return python.exists() and stamp.exists() and stamp.read_text() == wanted

    if finished():
        return python
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two processes on one machine (two exports, two tests) build an environment once: the second waits for
    # the first's lock, then finds it finished.
    with open(folder.parent / f".{runtime.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not finished():
            _build(runtime, folder, wanted)
    # venv writes absolute paths into its scripts; the interpreter itself is found relative to pyvenv.cfg
    return python


def _build(runtime: Runtime, folder: Path, wanted: str) -> None:
    # Built beside its final place and renamed into it: an interrupted install never looks finished.
    building = Path(tempfile.mkdtemp(prefix=f".{runtime.name}-", dir=folder.parent))
    try:
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(building)], f"creating the {runtime.name} environment")
        _run([str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *runtime.requirements], f"installing {' '.join(runtime.requirements)} into the {runtime.name} environment")
        (building / INSTALLED).write_text(wanted)
        shutil.rmtree(folder, ignore_errors=True)
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _run(command: list[str], doing: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ExportError(f"{doing} failed ({' | '.join(tail)}); the environments live in {environments_root()} "
                          "(set EDGESHIP_RUNTIMES to move them)")


def runner_script() -> Path:
    """device_tests/runner.py: dependency-free, the code every device runs."""
    spec = importlib.util.find_spec("device_tests.runner")
    assert spec is not None and spec.origin is not None  # installed with this package
    return Path(spec.origin)


def runner_job(model: dict[str, Any], golden: dict[str, Any], artifacts: list[dict[str, Any]], workdir: str, *,
               iterations: int, warmup: int, time_budget_s: float) -> dict[str, Any]:
    """The runner's job: what to run and compare, from an export manifest's model and golden records and the
    artifact records to run (each with its thresholds)."""
    return {"workdir": workdir, "kind": golden.get("kind", "tensors"),
            "inputs": [i["name"] for i in model["inputs"]], "outputs": model["outputs"],
            "logits_outputs": model.get("logits_outputs", []), "padding_mask": model.get("padding_mask"),
            "golden_sets": golden["sets"], "iterations": iterations, "warmup": warmup, "time_budget_s": time_budget_s,
            "artifacts": [{"name": r["name"], "file": r["file"], "format": r["format"],
                           "thresholds": r.get("thresholds", {})} for r in artifacts]}


def run_on(runtime: Runtime, artifact: Path, companions: list[Path], golden_file: Path, model: dict[str, Any],
           golden: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The runner's measurement of one artifact on ``runtime`` (metrics, checks, passed; or error)."""
    python = python_of(runtime)
    with tempfile.TemporaryDirectory(prefix="edgeship-runtime-") as work:
        folder = Path(work)
        for path in [artifact, *companions]:
            (folder / path.name).symlink_to(path.resolve())
        (folder / "golden.npz").symlink_to(golden_file.resolve())
        job = runner_job(model, golden, [dict(record, file=artifact.name)], str(folder),
                         iterations=3, warmup=0, time_budget_s=10.0)
        (folder / "job.json").write_text(json.dumps(job))
        done = subprocess.run([str(python), str(runner_script()), str(folder / "job.json")], cwd=folder,
                              capture_output=True, text=True)
        result_file = folder / "result.json"
        if done.returncode != 0 or not result_file.exists():
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            return {"error": f"the runner stopped (exit {done.returncode}): {tail[0][:300]}", "passed": False}
        result = json.loads(result_file.read_text())
    measured = result["artifacts"][record["name"]]
    versions = result.get("facts", {}).get("runtimes", {})
    kept = {k: measured[k] for k in ("metrics", "checks", "error") if k in measured}
    return {**kept, "passed": bool(measured.get("passed")), "versions": versions, "arch": result["facts"].get("arch")}


def for_format(names: tuple[str, ...], fmt: str) -> list[Runtime]:
    return [RUNTIMES[n] for n in names if fmt in RUNTIMES[n].formats]


def describe_failure(name: str, measured: dict[str, Any]) -> str:
    if measured.get("error"):
        return f"on {name}: {measured['error']}"
    failed = [c for c in measured.get("checks", []) if not c["passed"]]
    return f"on {name}: " + ", ".join(f"{c['metric']} {c['measured']:.4g} (needs {c['required']:g})" for c in failed)


def judge_record(record: dict[str, Any], spec: Any) -> None:
    """An artifact that passed on the host passes only if it passes on every runtime of its target."""
    from .validate import judge  # the parity rules, with the toolchain they load: not at target loading

    for name, measured in record.get("runtimes", {}).items():
        if "metrics" in measured:
            verdict = judge(measured["metrics"], spec.parity)
            measured.update(checks=verdict["checks"], passed=verdict["passed"])
        if record.get("status") == "passed" and not measured.get("passed"):
            record["status"] = "failed"
            record["failures"] = record.get("failures", []) + [describe_failure(name, measured)]
