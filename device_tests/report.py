"""A run's reports, re-rendered from its folder: Markdown for people, a self-contained HTML page with
latency plots, and summary.json for machines; optionally compared with a baseline run.

A regression is a (device, artifact) pair that got slower at the median by more than the threshold,
lost accuracy beyond what the golden comparison tolerates, or went from passing to failing.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter import files
from exporter.errors import DeviceError

DEFAULT_REGRESSION = 0.10  # 10% slower at p50
# Accuracy drops smaller than these are numeric noise between runs of the same artifact.
METRIC_TOLERANCE = {"cosine": 1e-4, "top1": 0.01, "token_agreement": 0.01, "greedy_match": 0.1}


_MEASURED = ("kind", "load_ms", "latency_ms", "peak_rss_mb", "metrics", "checks", "ttft_ms", "prefill_tokens_per_s",
             "decode_tokens_per_s", "generate_tokens_per_s", "encode_ms", "note")


def _num(value: float | None, digits: int = 3) -> str:
    """A measured number, or '-' where the runner does not report it (benchmark_model prints no p90/p99)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _read(path: Path) -> dict[str, Any]:
    """run.json or a device's result: a file cut short (a killed run, a full disk) is named, never half-rendered."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{path}: not valid JSON ({exc}); the run was cut short or the file was edited: "
                          "re-run `edgeship device-test` (or restore the file)") from exc
    if not isinstance(data, dict):
        raise DeviceError(f"{path}: must hold a JSON object, not a {type(data).__name__}; "
                          "re-run `edgeship device-test` (or restore the file)")
    return data


def _device_results(run_folder: Path) -> list[dict[str, Any]]:
    run = _read(run_folder / "run.json")
    results = []
    for name in run["devices"]:
        path = run_folder / f"{name}.json"
        results.append(_read(path) if path.is_file()
                       else {"device": name, "ok": False, "reason": "no result (the run was interrupted)"})
    return results


def _rows(run_folder: Path) -> list[dict[str, Any]]:
    """One row per (device, artifact), failures included, in inventory order."""
    rows = []
    for result in _device_results(run_folder):
        artifacts = result.get("artifacts") or {}
        if not artifacts:
            rows.append({"device": result["device"], "artifact": None, "passed": False,
                         "error": result.get("reason", "")})
        for name, measured in artifacts.items():
            row = {"device": result["device"], "artifact": name, "passed": bool(measured.get("passed")),
                   "emulated": bool(result.get("emulated"))}
            if "error" in measured:
                row["error"] = measured["error"]
            else:
                row.update({key: measured[key] for key in _MEASURED if key in measured})
                row["samples_ms"] = measured.get("samples_ms", [])
                if not row["passed"]:
                    row["error"] = ", ".join(f"{c['metric']} {c['measured']:.4g} vs {c['required']}"
                                             for c in measured.get("checks", []) if not c["passed"]) or "failed"
            rows.append(row)
    return rows


@dataclass
class Comparison:
    baseline: str
    threshold: float
    lines: list[dict[str, Any]]

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["regression"]]


def compare(run_folder: Path, baseline_folder: Path, threshold: float = DEFAULT_REGRESSION) -> Comparison:
    before = {(r["device"], r["artifact"]): r for r in _rows(baseline_folder) if r["artifact"]}
    lines = []
    for row in _rows(run_folder):
        if not row["artifact"]:
            continue
        old = before.get((row["device"], row["artifact"]))
        line = {"device": row["device"], "artifact": row["artifact"], "regression": False, "notes": []}
        if old is None:
            line["notes"].append("not in the baseline")
        elif old["passed"] and not row["passed"]:
            line["regression"] = True
            line["notes"].append(f"passed in the baseline, fails now ({row.get('error', '')})")
        was, now = (old or {}).get("latency_ms", {}).get("p50"), row.get("latency_ms", {}).get("p50")
        if row["emulated"] or (old or {}).get("emulated"):
            line["notes"].append("emulated: timings not compared")
        elif was is not None and now is not None:
            line["p50_before_ms"], line["p50_now_ms"], line["p50_ratio"] = was, now, now / was if was else None
            if was and now > was * (1 + threshold):
                line["regression"] = True
                line["notes"].append(f"p50 {now:.3f} ms vs {was:.3f} ms (+{(now / was - 1) * 100:.0f}%, "
                                     f"threshold {threshold * 100:.0f}%)")
        for metric, tolerance in METRIC_TOLERANCE.items():
            was = (old or {}).get("metrics", {}).get(metric)
            now = row.get("metrics", {}).get(metric)
            if was is not None and now is not None and now < was - tolerance:
                line["regression"] = True
                line["notes"].append(f"{metric} {now:.6g} vs {was:.6g}")
        lines.append(line)
    return Comparison(str(baseline_folder), threshold, lines)


def summary(run_folder: Path, comparison: Comparison | None = None) -> dict[str, Any]:
    """What a CI pipeline reads: per device and artifact the numbers and verdicts, and the regressions."""
    run = _read(run_folder / "run.json")
    devices: dict[str, Any] = {}
    for result in _device_results(run_folder):
        devices[result["device"]] = {"ok": bool(result.get("ok")), "reason": result.get("reason", ""),
                                     "emulated": bool(result.get("emulated")), "artifacts": {}}
    for row in _rows(run_folder):
        if row["artifact"]:
            devices[row["device"]]["artifacts"][row["artifact"]] = {
                key: row[key] for key in ("passed", "error", *_MEASURED) if key in row and key != "checks"}
    out: dict[str, Any] = {"run": run_folder.name, "export": run["export"], "target": run["target"], "model": run["model"],
                           "manifest_sha256": run["manifest_sha256"], "runner_version": run["runner_version"],
                           "ok": all(d["ok"] for d in devices.values()), "devices": devices}
    if comparison is not None:
        out["baseline"] = {"run": comparison.baseline, "threshold": comparison.threshold,
                           "regressions": comparison.regressions, "compared": comparison.lines}
    return out


def _speed(row: dict[str, Any]) -> str:
    """Language models: what a chat app feels (tokens/s and time to first token); the p50 columns are per token."""
    if row.get("kind") == "text-to-text":
        return f"decode {row.get('decode_tokens_per_s') or 0:.0f} tok/s, encode {row.get('encode_ms') or 0:.0f} ms"
    if row.get("kind") != "language-model":
        return "-"
    if row.get("decode_tokens_per_s") is None and row.get("generate_tokens_per_s") is not None:
        return f"generation {row['generate_tokens_per_s']:.0f} tok/s (prompt included)"  # ExecuTorch's Benchmark app
    return (f"decode {row['decode_tokens_per_s'] or 0:.0f} tok/s, prefill {row['prefill_tokens_per_s'] or 0:.0f} tok/s, "
            f"TTFT {row['ttft_ms'] or 0:.0f} ms")


def _metrics(row: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:.6g}" for name, value in row.get("metrics", {}).items())


def _verdict(row: dict[str, Any]) -> str:
    return "passed" if row["passed"] else f"FAILED: {row.get('error', '')}"


def render_markdown(run_folder: Path, comparison: Comparison | None = None) -> str:
    run = _read(run_folder / "run.json")
    lines = [f"# Device run {run_folder.name}", "",
             f"Export `{run['export']}` (target {run['target']}, model {run['model']}, manifest sha256 "
             f"{run['manifest_sha256'][:12]}), runner v{run['runner_version']}, started {run['started']}.", "",
             "| device | artifact | load ms | p50 ms | p90 ms | p99 ms | peak RSS MB | tokens | metrics | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = _rows(run_folder)
    for row in rows:
        if "latency_ms" not in row:
            lines.append(f"| {row['device']} | {row['artifact'] or '-'} | | | | | | | | {_verdict(row)} |")
            continue
        latency = row["latency_ms"]
        device = f"{row['device']} (emulated)" if row["emulated"] else row["device"]
        lines.append(f"| {device} | {row['artifact']} | {_num(row.get('load_ms'), 1)} | {_num(latency['p50'])} | "
                     f"{_num(latency['p90'])} | {_num(latency['p99'])} | {_num(row.get('peak_rss_mb'), 0)} | "
                     f"{_speed(row)} | {_metrics(row)} | {_verdict(row)} |")
    failed = [r["device"] for r in _device_results(run_folder) if not r.get("ok")]
    lines += ["", f"Failed devices: {', '.join(failed)}" if failed else "All devices passed.", "",
              "p50/p90/p99 are per inference; for language models, per decoded token."]
    if any(row.get("emulated") for row in rows):
        lines.append("Devices marked (emulated) run on an emulated CPU: their results prove correctness on its "
                     "instruction set; their timings are the emulator's, not a device's.")
    lines += [f"- {row['device']} / {row['artifact']}: {row['note']}" for row in rows if row.get("note")]
    if comparison is not None:
        lines += ["", f"## Against baseline {Path(comparison.baseline).name}", "",
                  "| device | artifact | p50 before ms | p50 now ms | ratio | regression |", "|---|---|---|---|---|---|"]
        for line in comparison.lines:
            ratio = f"{line['p50_ratio']:.2f}" if line.get("p50_ratio") else "-"
            before = f"{line['p50_before_ms']:.3f}" if "p50_before_ms" in line else "-"
            now = f"{line['p50_now_ms']:.3f}" if "p50_now_ms" in line else "-"
            flag = ("REGRESSION: " if line["regression"] else "") + "; ".join(line["notes"])
            lines.append(f"| {line['device']} | {line['artifact']} | {before} | {now} | {ratio} | {flag or 'no'} |")
        count = len(comparison.regressions)
        lines += ["", f"{count} regression(s) beyond {comparison.threshold * 100:.0f}%." if count else "No regressions."]
    return "\n".join(lines) + "\n"


def _histogram_svg(samples: list[float], latency: dict[str, float], width: int = 360, height: int = 110) -> str:
    """Latency distribution as an inline SVG histogram with p50/p90/p99 marks (no plotting library)."""
    if not samples:
        return "<p>no samples</p>"
    low, high = min(samples), max(samples)
    span = (high - low) or max(high, 1e-9) * 0.01
    bins = [0] * 24
    for value in samples:
        bins[min(len(bins) - 1, int((value - low) / span * len(bins)))] += 1
    top, plot_h, bar_w = max(bins), height - 30, width / len(bins)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, count in enumerate(bins):
        bar_h = plot_h * count / top
        parts.append(f'<rect x="{i * bar_w:.1f}" y="{plot_h - bar_h + 5:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{bar_h:.1f}" fill="#4a7ab5"><title>{count} runs</title></rect>')
    for label, color in (("p50", "#2a2"), ("p90", "#c80"), ("p99", "#c22")):
        if latency.get(label) is None:
            continue
        x = (latency[label] - low) / span * width
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="5" y2="{plot_h + 5}" stroke="{color}" stroke-width="2"/>')
    parts.append(f'<text x="0" y="{height - 8}" font-size="11">{low:.3f} ms</text>')
    parts.append(f'<text x="{width}" y="{height - 8}" font-size="11" text-anchor="end">{high:.3f} ms</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(run_folder: Path, comparison: Comparison | None = None) -> str:
    """One page, no external files or scripts: every value from the inventory or results is escaped."""
    run = _read(run_folder / "run.json")
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>Device run {e(run_folder.name)}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}.pass{color:#1a7f1a}"
           ".fail{color:#b00;font-weight:bold}.card{display:inline-block;margin:8px;padding:8px;border:1px solid #ddd}"
           "</style></head><body>",
           f"<h1>Device run {e(run_folder.name)}</h1>",
           f"<p>Export <code>{e(run['export'])}</code>, target {e(run['target'])}, model {e(run['model'])}, manifest "
           f"sha256 {e(run['manifest_sha256'][:12])}, runner v{e(str(run['runner_version']))}, started {e(run['started'])}.</p>",
           "<table><tr><th>device</th><th>artifact</th><th>load ms</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th>"
           "<th>peak RSS MB</th><th>tokens</th><th>metrics</th><th>verdict</th></tr>"]
    rows = _rows(run_folder)
    for row in rows:
        css = "pass" if row["passed"] else "fail"
        cells = [e(row["device"]) + (" (emulated)" if row.get("emulated") else ""), e(row["artifact"] or "-")]
        if "latency_ms" in row:
            latency = row["latency_ms"]
            cells += [_num(row.get("load_ms"), 1), _num(latency["p50"]), _num(latency["p90"]), _num(latency["p99"]),
                      _num(row.get("peak_rss_mb"), 0), e(_speed(row)), e(_metrics(row))]
        else:
            cells += [""] * 7
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td class='{css}'>{e(_verdict(row))}</td></tr>")
    out.append("</table>")
    if any(row.get("emulated") for row in rows):
        out.append("<p>Devices marked (emulated) run on an emulated CPU: their results prove correctness on its "
                   "instruction set; their timings are the emulator's, not a device's.</p>")
    out.append("<h2>Latency distributions</h2>")
    for row in rows:
        if row.get("samples_ms"):  # native runners that print only a summary have no per-run samples
            out.append(f"<div class='card'><b>{e(row['device'])}</b> / {e(row['artifact'])}<br>"
                       f"{_histogram_svg(row['samples_ms'], row['latency_ms'])}<br><small>{len(row['samples_ms'])} runs; "
                       "lines: p50 green, p90 orange, p99 red</small></div>")
    if comparison is not None:
        out.append(f"<h2>Against baseline {e(Path(comparison.baseline).name)}</h2><table><tr><th>device</th>"
                   "<th>artifact</th><th>p50 before ms</th><th>p50 now ms</th><th>ratio</th><th>regression</th></tr>")
        for line in comparison.lines:
            css = "fail" if line["regression"] else "pass"
            cells = [e(line["device"]), e(line["artifact"]),
                     f"{line['p50_before_ms']:.3f}" if "p50_before_ms" in line else "-",
                     f"{line['p50_now_ms']:.3f}" if "p50_now_ms" in line else "-",
                     f"{line['p50_ratio']:.2f}" if line.get("p50_ratio") else "-"]
            note = ("REGRESSION: " if line["regression"] else "") + "; ".join(line["notes"])
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td class='{css}'>{e(note or 'no')}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_reports(run_folder: Path, baseline: Path | None = None,
                  threshold: float = DEFAULT_REGRESSION) -> tuple[Path, Comparison | None]:
    """report.md, report.html and summary.json in the run folder; returns the Markdown path."""
    comparison = compare(run_folder, baseline, threshold) if baseline is not None else None
    markdown = run_folder / "report.md"
    files.write_text(markdown, render_markdown(run_folder, comparison))
    files.write_text(run_folder / "report.html", render_html(run_folder, comparison))
    files.write_json(run_folder / "summary.json", summary(run_folder, comparison))
    return markdown, comparison
