"""A run's report: Markdown for people, summary.json for machines. Re-rendered from the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _device_results(run_folder: Path) -> list[dict[str, Any]]:
    run = json.loads((run_folder / "run.json").read_text())
    results = []
    for name in run["devices"]:
        path = run_folder / f"{name}.json"
        results.append(json.loads(path.read_text()) if path.is_file()
                       else {"device": name, "ok": False, "reason": "no result (the run was interrupted)"})
    return results


def render_markdown(run_folder: Path) -> str:
    run = json.loads((run_folder / "run.json").read_text())
    lines = [f"# Device run {run_folder.name}", "",
             f"Export `{run['export']}` (target {run['target']}, model {run['model']}, manifest sha256 "
             f"{run['manifest_sha256'][:12]}), runner v{run['runner_version']}, started {run['started']}.", "",
             "| device | artifact | load ms | p50 ms | p90 ms | p99 ms | peak RSS MB | cosine | max abs err | top-1 | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in _device_results(run_folder):
        artifacts = result.get("artifacts") or {}
        if not artifacts:
            lines.append(f"| {result['device']} | - | | | | | | | | | FAILED: {result.get('reason', '')} |")
            continue
        for name, measured in artifacts.items():
            if "error" in measured:
                lines.append(f"| {result['device']} | {name} | | | | | | | | | FAILED: {measured['error']} |")
                continue
            latency, metrics = measured["latency_ms"], measured["metrics"]
            top1 = f"{metrics['top1']:.3f}" if "top1" in metrics else "-"
            verdict = "passed" if measured.get("passed") else "FAILED: " + ", ".join(
                f"{c['metric']} {c['measured']:.4g} vs {c['required']}" for c in measured.get("checks", []) if not c["passed"])
            lines.append(f"| {result['device']} | {name} | {measured['load_ms']:.1f} | {latency['p50']:.3f} | "
                         f"{latency['p90']:.3f} | {latency['p99']:.3f} | {measured['peak_rss_mb']:.0f} | "
                         f"{metrics['cosine']:.6f} | {metrics['max_abs_error']:.4g} | {top1} | {verdict} |")
    failed = [r["device"] for r in _device_results(run_folder) if not r.get("ok")]
    lines += ["", f"Failed devices: {', '.join(failed)}" if failed else "All devices passed."]
    return "\n".join(lines) + "\n"


def write_report(run_folder: Path) -> Path:
    path = run_folder / "report.md"
    path.write_text(render_markdown(run_folder))
    return path
