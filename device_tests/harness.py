"""Run an export on devices: check, push, run, pull, clean; in parallel; nothing lost.

Each run gets its own folder ``results/<run-id>/`` holding the settings, the manifest's hash, each
device's facts and result (written as soon as that device finishes) and local logs. One device failing
never stops the others; the run ends with a per-device summary.
"""

from __future__ import annotations

import json
import secrets
import shlex
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exporter import files, manifest
from exporter.errors import DeviceError
from exporter.runtimes import runner_job

from . import runner as runner_module
from .inventory import DeviceSpec
from .report import write_reports
from .transport import SshDevice, push, remote_path

RUNTIMES_FOR = {"tflite": ("ai_edge_litert", "tflite_runtime"), "pte": ("executorch",), "mlpackage": ("coremltools",)}


@dataclass
class Settings:
    iterations: int = 50
    warmup: int = 3
    time_budget_s: float = 60.0
    trust_new_hosts: bool = False
    known_hosts: Path | None = None
    keep_remote: bool = False


@dataclass
class DeviceOutcome:
    device: str
    ok: bool
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def new_run_folder(root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = root / f"{stamp}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)  # never an existing folder: nothing from a previous run is overwritten
    return folder


def plan(data: dict[str, Any], facts: dict[str, Any], device: DeviceSpec) -> list[dict[str, Any]]:
    """The artifacts of this export the device can run, or a DeviceError saying why none."""
    present = set(facts.get("runtimes", {}))
    runnable, missing = [], set()
    for record in data["artifacts"]:
        # pending-mac: Core ML packages the host could not execute; a Mac can
        if record.get("status") not in ("passed", "failed", "pending-mac") or record["format"] not in RUNTIMES_FOR:
            continue
        if present & set(RUNTIMES_FOR[record["format"]]):
            runnable.append(record)
        else:
            missing.add(f".{record['format']} needs {' or '.join(RUNTIMES_FOR[record['format']])}")
    if not runnable:
        raise DeviceError(f"{device.name} ({facts.get('arch')}, runtimes: {', '.join(sorted(present)) or 'none'}) "
                          f"cannot run any artifact of this export: {'; '.join(sorted(missing)) or 'nothing to run'}")
    return runnable


def run_device(spec: DeviceSpec, export_folder: Path, data: dict[str, Any], run_folder: Path,
               settings: Settings) -> DeviceOutcome:
    """One device, start to end; ``data`` is the export's manifest. Its result file is written whatever happens."""
    log_path = run_folder / f"{spec.name}.log"
    log: list[str] = []
    connection: Any = None
    try:
        if spec.transport == "adb":
            from . import adb

            connection = adb.SshHost(_ssh(spec, settings)) if spec.host else adb.LocalHost()
            result = adb.run_phone(spec, export_folder, data, run_folder, settings, connection, log)
        elif spec.iphone:
            from . import iphone

            connection = _ssh(spec, settings)  # the Mac the iPhone is attached to
            result = iphone.run_iphone(spec, export_folder, data, run_folder, settings, connection, log)
        else:
            connection = _ssh(spec, settings)  # an ssh board, or a Mac (the same runner, with coremltools)
            result = _run_board(connection, spec, export_folder, data, run_folder, settings, log)
        failed = [n for n, m in result["artifacts"].items() if not m.get("passed")]
        reason = "; ".join(f"{n}: {result['artifacts'][n].get('error') or _failed_checks(result['artifacts'][n])}"
                           for n in failed)
        outcome = DeviceOutcome(spec.name, not failed, reason, result)
    except DeviceError as exc:
        outcome = DeviceOutcome(spec.name, False, str(exc))
    except Exception as exc:  # a bug in the harness: keep the traceback in the device's log, not lost
        log.append(traceback.format_exc())
        outcome = DeviceOutcome(spec.name, False, f"unexpected {type(exc).__name__}: {exc}")
    finally:
        if connection is not None:
            connection.close()
        log_path.write_text("\n".join(log) + "\n")
    files.write_json(run_folder / f"{spec.name}.json", {"device": spec.name, "ok": outcome.ok, "reason": outcome.reason,
                                                          "emulated": spec.emulated, **outcome.result})
    return outcome


def _ssh(spec: DeviceSpec, settings: Settings) -> SshDevice:
    return SshDevice(spec, known_hosts=settings.known_hosts, trust_new_hosts=settings.trust_new_hosts)


def _run_board(device: SshDevice, spec: DeviceSpec, export_folder: Path, data: dict[str, Any], run_folder: Path,
               settings: Settings, log: list[str]) -> dict[str, Any]:
    """A board with Python: push runner.py and the artifacts, run the job there, pull its result."""
    q = shlex.quote
    python = q(spec.python)
    facts = board_facts(device, spec)
    log.append(f"facts: {json.dumps(facts)}")
    artifacts = plan(data, facts, spec)
    to_push = {record["file"]: record["sha256"] for record in artifacts}
    to_push.update(manifest.program_data_files(artifacts))
    to_push[data["golden"]["file"]] = data["golden"]["sha256"]
    need = sum((export_folder / name).stat().st_size for name in to_push)
    if facts["free_bytes"] < need * 1.1:
        raise DeviceError(f"{spec.name}: only {facts['free_bytes'] / 1e6:.1f} MB free in {spec.workdir}, "
                          f"the artifacts need {need / 1e6:.1f} MB")
    cached = {f"{sha}{Path(name).suffix}" for name, sha in to_push.items()}
    remote_paths = " ".join(q(remote_path(spec, "cache", c)) for c in sorted(cached))
    have = json.loads(device.run(f"{python} {q(remote_path(spec, 'runner.py'))} --hashes {remote_paths}").stdout)
    pushed, skipped = [], []
    for name, sha in to_push.items():
        remote = remote_path(spec, "cache", f"{sha}{Path(name).suffix}")
        if have.get(remote) == sha:
            skipped.append(name)
            continue
        push(device, export_folder / name, remote, run_folder)
        pushed.append(name)
    log.append(f"pushed {pushed}, already there {skipped}")
    job_dir = remote_path(spec, f"run-{run_folder.name}")
    device.run(f"mkdir -p {q(job_dir)}")
    for name, sha in to_push.items():  # the job sees the artifacts under their own names
        device.run(f"ln -sf {q(remote_path(spec, 'cache', sha + Path(name).suffix))} {q(job_dir + '/' + name)}")
    job = runner_job(data["model"], data["golden"], artifacts, job_dir, iterations=settings.iterations,
                     warmup=settings.warmup, time_budget_s=settings.time_budget_s)
    job_file = run_folder / f"{spec.name}.job.json"
    job_file.write_text(json.dumps(job))
    device.put(job_file, job_dir + "/job.json")
    device.run(f"cd {q(job_dir)} && {python} ../runner.py job.json > runner.out 2> runner.err")
    local_result = run_folder / f"{spec.name}.result.json"
    device.get(job_dir + "/result.json", local_result)
    result = json.loads(local_result.read_text())
    outputs_dir = run_folder / f"{spec.name}.outputs"
    outputs_dir.mkdir(exist_ok=True)
    for measured in result["artifacts"].values():
        if "outputs_file" in measured:
            device.get(f"{job_dir}/{measured['outputs_file']}", outputs_dir / measured["outputs_file"])
    if not settings.keep_remote:
        device.run(f"rm -rf {q(job_dir)}")
    return {"facts": facts, **result, "pushed": pushed, "skipped": skipped}


def board_facts(device: SshDevice, spec: DeviceSpec) -> dict[str, Any]:
    """Push runner.py into the work folder and read the device's facts; a "mac" must run macOS."""
    q = shlex.quote
    device.run(f"mkdir -p {q(remote_path(spec, 'cache'))}")
    device.put(Path(runner_module.__file__), remote_path(spec, "runner.py"))
    facts = json.loads(device.run(f"{q(spec.python)} {q(remote_path(spec, 'runner.py'))} --facts {q(spec.workdir)}").stdout)
    if spec.transport == "mac" and facts.get("os") != "Darwin":
        raise DeviceError(f"{spec.name}: {spec.host} runs {facts.get('os')}, not macOS; Core ML needs a Mac "
                          "(use transport = \"ssh\" for this device)")
    return facts


def _failed_checks(measured: dict[str, Any]) -> str:
    return ", ".join(f"{c['metric']} {c['measured']:.4g} vs {c['required']}" for c in measured.get("checks", [])
                     if not c["passed"]) or "no threshold applies"


def run_devices(specs: list[DeviceSpec], export_folder: Path, results_root: Path, settings: Settings) -> tuple[Path, list[DeviceOutcome]]:
    data = manifest.require(export_folder)
    run_folder = new_run_folder(results_root)
    files.write_json(run_folder / "run.json", {
        "export": str(export_folder.resolve()), "manifest_sha256": files.sha256_of(export_folder / manifest.MANIFEST),
        "target": data["target"]["name"], "model": data["model"]["name"], "devices": [s.name for s in specs],
        "runner_version": runner_module.RUNNER_VERSION, "settings": {k: str(v) for k, v in vars(settings).items()},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
        outcomes = list(pool.map(lambda s: run_device(s, export_folder, data, run_folder, settings), specs))
    write_reports(run_folder)
    return run_folder, outcomes
