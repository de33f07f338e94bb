"""The export pipeline: model -> (per artifact) quantise, convert, write, validate -> manifest.

One function, ``export``. The float program is traced once and shared by every artifact that can
take it; each artifact is built in a staging folder and renamed into place only when complete;
the manifest is written last, so a folder without one was never finished. What a re-run may reuse
instead of building, and why, is exporter.reuse's to say.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import files, lm_parity, manifest, memory_plan, reuse, runtimes, seq2seq, seq2seq_parity
from .errors import ConversionError, ExportError, OutputError
from .formats import format_module
from .heap import FLOAT_COPY_RELEASED, return_freed_memory
from .progress import Progress
from .quant import SCHEMES
from .sources import LoadedModel
from .targets import ArtifactSpec, Target
from .validate import Golden, make_golden, measure, record_verdict

OK_STATUSES = ("passed", "pending-mac")
_STOPPING = threading.Event()  # set when an export fails: an artifact checked beside it stops at its next step


@dataclass
class ArtifactResult:
    spec: ArtifactSpec
    status: str  # passed | failed | error | pending-mac
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


@dataclass
class ExportSummary:
    folder: Path
    results: list[ArtifactResult]
    fp32_bytes: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def fp32_size(model: LoadedModel) -> int:
    """Bytes of the model's weights in fp32, each stored tensor once (a tied embedding/lm_head counts once)."""
    seen, total = set(), 0
    for tensor in model.module.state_dict().values():
        if tensor.is_floating_point() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * 4
    return total


def export(
    target: Target,
    model: LoadedModel,
    output_root: Path,
    *,
    only: tuple[str, ...] = (),
    progress: Progress | None = None,
    parallel: bool = True,
    memory_check: bool = True,
) -> ExportSummary:
    """``parallel``: a language model's litert-torch export (a child process) starts first and converts on
    another core while this process builds the other artifacts (on 2 cores 0.84x the time of building
    one after the other, 3.77 instead of 3.50 GiB for all processes: docs/measurements.md "Export time and memory").
    ``memory_check``: a language model's export is estimated first; it goes one artifact at a time when only
    that fits the memory available, and is refused when nothing does (exporter.memory_plan)."""
    progress = progress or Progress(quiet=True)
    folder = output_root / target.name / model.name
    specs = [s for s in target.artifacts if not only or s.format.value in only or s.name in only]
    if not specs:
        raise ExportError(f"--only {','.join(only)} matches no artifact of target {target.name} "
                          f"({', '.join(s.filename for s in target.artifacts)})")
    left_out = [s for s in specs if not s.builds_for(model.kind)]
    specs = [s for s in specs if s.builds_for(model.kind)]
    if not specs:
        raise ExportError(f"target {target.name} builds no artifact for {model.kind} models: "
                          + "; ".join(f"{s.filename} is for {' and '.join(s.models)} models" for s in left_out))
    for spec in left_out:
        progress.say(f"{spec.filename}: not built, target {target.name} builds it for {' and '.join(spec.models)} models only")
    reference = fp32_size(model)
    if model.language is not None and memory_check:
        memory = memory_plan.plan(reference, parallel, any(s.format.value == "tflite" for s in specs),
                                  memory_plan.available_bytes())
        if memory.note:
            progress.say(memory.note)
        parallel = memory.parallel
    files.ensure_writable(folder, needed_bytes=reference * 2)
    files.remove_stale_staging(folder)
    previous = manifest.read(folder) or {}
    previous_records = {a["name"]: a for a in previous.get("artifacts", [])}
    tools = manifest.toolchain()

    with contextlib.ExitStack() as in_fp32:
        if model.language is not None:
            # fp32 from the eager reference through smoothing's calibration pass below: upcast once, not twice
            in_fp32.enter_context(model.language.computing_in_fp32())
            with progress.stage("eager fp32 reference: teacher-forced text and greedy answers"):
                golden: Golden | lm_parity.Reference | seq2seq_parity.Reference = lm_parity.reference(model.language)
            np.savez(folder / manifest.GOLDEN, **golden.golden_arrays())
            bundle = bundle_files(folder, model.language)
        elif model.seq2seq is not None:
            with progress.stage("eager fp32 reference: teacher-forced targets and greedy answers"):
                golden = seq2seq_parity.reference(model.seq2seq)
            np.savez(folder / manifest.GOLDEN, **golden.golden_arrays())
            bundle = bundle_seq2seq_files(folder, model.seq2seq)
        else:
            golden = make_golden(model, reuse.GOLDEN_SETS)
            golden.save(folder / manifest.GOLDEN)
            bundle = {}
        program: torch.export.ExportedProgram | None = model.program
        model_record = {"name": model.name, "source": model.source, "fingerprint": model.fingerprint,
                        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                                   for n, t in zip(model.input_names, model.sample_inputs)],
                        "outputs": list(model.output_names), "logits_outputs": sorted(model.logits_outputs),
                        "padding_mask": model.padding_mask, "fp32_bytes": reference}
        golden_record = {"file": manifest.GOLDEN, "sha256": files.sha256_of(folder / manifest.GOLDEN),
                         "kind": golden_kind(model), "sets": reuse.GOLDEN_SETS}
        # Decided once per artifact: reuse this folder's copy, copy another target's, or build.
        plans = [reuse.plan(model, spec, tools, folder, previous_records.get(spec.name), output_root, target.name)
                 for spec in specs]
        # A language model's answers are known now: its weights wait on disk while the builds work on copies.
        parking = model.language is not None and any(plan.builds for plan in plans)
        if parking and any(plan.builds and plan.spec.smoothing for plan in plans):
            with progress.stage("calibration pass for smoothing"):
                model.language.calibration_maxima()  # on the reference, before its weights are parked
    with model.language.reference_parked(folder) if parking else contextlib.nullcontext():
        if parallel and model.language is not None:
            for plan in plans:
                if plan.spec.format.value == "tflite" and plan.builds:
                    format_module("tflite").start_decoder(model, plan.spec, folder)
                    progress.say(f"{plan.spec.filename}: litert-torch's export started in a child process, beside the others")
        try:
            results = _build_all(model, program, plans, folder, golden, progress,
                                 _RuntimeCheck(folder / manifest.GOLDEN, model_record, golden_record))
        finally:
            format_module("tflite").cancel_started()  # any export started ahead and not collected

    # Artifacts of this target that were not rebuilt this time keep their previous records.
    done = {r.spec.name for r in results}
    kept = [previous_records[s.name] for s in target.artifacts if s.name not in done and s.name in previous_records]
    records = [r.record for r in results] + kept
    order = {s.name: i for i, s in enumerate(target.artifacts)}
    records.sort(key=lambda r: order.get(r["name"], len(order)))
    files.write_json(folder / manifest.MANIFEST, {
        "schema": manifest.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_record,
        "target": {"name": target.name, "file": str(target.path), "sha256": target.sha256,
                   "description": target.description},
        "golden": golden_record,
        "bundle": bundle,
        "toolchain": tools,
        "artifacts": records,
    })
    return ExportSummary(folder, results, reference)


@dataclass
class _RuntimeCheck:
    """What running an artifact on the target's other runtimes needs: the golden data and how to compare."""

    golden_file: Path
    model_record: dict[str, Any]
    golden_record: dict[str, Any]

    def run(self, spec: ArtifactSpec, artifact: Path, companions: list[Path], record: dict[str, Any],
            progress: Progress) -> None:
        """Each of the spec's runtimes that has an environment of its own, measured into record["runtimes"]."""
        for runtime in runtimes.for_format(spec.runtimes, spec.format.value):
            if not runtime.requirements:  # the exporter's own runtime: the parity check above ran on it
                continue
            with progress.stage(f"{spec.filename}: parity on {runtime.name}"):
                record.setdefault("runtimes", {})[runtime.name] = runtimes.run_on(
                    runtime, artifact, companions, self.golden_file, self.model_record, self.golden_record, record)


def _build_all(model: LoadedModel, program: torch.export.ExportedProgram | None, plans: list[reuse.Plan], folder: Path,
               golden: Golden | lm_parity.Reference, progress: Progress, on_runtimes: _RuntimeCheck) -> list[ArtifactResult]:
    """Each artifact in the target's order: reused if unchanged, copied if another target built it, else built.

    An artifact whose export was started ahead in a child process (start_decoder) is finished and checked
    in a thread beside the others, once its child has converted and the build in progress has let go of its
    float working copy: a .pte's lowering runs on one core, and the .tflite's quantising and parity check
    fill the other (docs/measurements.md "Export cost against model size")."""
    tflite = format_module("tflite")
    ahead = {plan.spec.name for plan in plans if plan.builds and plan.spec.format.value == "tflite"
             and tflite.started_ahead(model, plan.spec)}
    done: dict[str, ArtifactResult] = {}
    failures: list[BaseException] = []

    def finish_beside(plan: reuse.Plan) -> None:
        try:
            tflite.wait_until_converted(model, plan.spec)
            FLOAT_COPY_RELEASED.wait()
            if not _STOPPING.is_set():
                done[plan.spec.name] = _build_or_reuse(model, program, plan, folder, golden, progress, on_runtimes)
        except BaseException as exc:  # handed to the main thread, which raises it
            failures.append(exc)

    _STOPPING.clear()
    FLOAT_COPY_RELEASED.clear()
    beside = [threading.Thread(target=finish_beside, args=(plan,), name=f"beside-{plan.spec.name}", daemon=True)
              for plan in plans if plan.spec.name in ahead]
    for thread in beside:
        thread.start()
    try:
        for plan in plans:
            if plan.spec.name in ahead:
                continue
            if plan.builds and program is None and model.kind == "tensor":
                with progress.stage(f"tracing {model.name} with torch.export (shared by every artifact)"):
                    program = _trace(model)
            done[plan.spec.name] = _build_or_reuse(model, program, plan, folder, golden, progress, on_runtimes)
            FLOAT_COPY_RELEASED.set()
    except BaseException:
        _STOPPING.set()  # the threads beside stop at their next step
        tflite.cancel_started()
        raise
    finally:
        FLOAT_COPY_RELEASED.set()
        for thread in beside:
            thread.join()
    if failures:
        raise failures[0]
    return [done[plan.spec.name] for plan in plans]


def _build_or_reuse(model: LoadedModel, program: torch.export.ExportedProgram | None, plan: reuse.Plan, folder: Path,
                    golden: Golden | lm_parity.Reference, progress: Progress, on_runtimes: _RuntimeCheck) -> ArtifactResult:
    spec = plan.spec
    if plan.reused is not None:
        reused = reuse.rejudge(plan.reused, spec)
        progress.say(f"{spec.filename}: unchanged since the last export, reused ({reused['status']})")
        return ArtifactResult(spec, reused["status"], reused)
    if plan.elsewhere is not None:
        origin, record = reuse.copy_from_other_target(plan.elsewhere, spec, folder)
        record = reuse.rejudge(record, spec)
        progress.say(f"{spec.filename}: the same artifact was built for target {origin}; copied, not rebuilt "
                     f"({record['status']})")
        return ArtifactResult(spec, record["status"], record)
    result = _build_one(model, program, spec, folder, golden, plan.key, progress, on_runtimes)
    return_freed_memory()  # the parity check's loaded runtimes and programs
    return result


def _measure_language_model(fmt: Any, spec: ArtifactSpec, path: Path, ref: lm_parity.Reference,
                            model: LoadedModel, record: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    stepper = fmt.lm_stepper(path, spec.backend)
    if stepper is None:
        return None
    metrics = lm_parity.measure(_stoppable(stepper), ref, model.language.eos_ids)
    record["generations"] = [model.language.tokenizer.decode(g) for g in metrics.pop("generations")]
    if spec.format.value == "pte" and (folder / "tokenizer.json").is_file():
        prompt = model.language.tokenizer.decode(ref.prompt_ids[0])
        record["text_llm_runner"] = fmt.run_text_llm_runner(path, folder / "tokenizer.json", prompt, len(ref.greedy[0]))
    return metrics


def _stoppable(step: lm_parity.LMStepper) -> lm_parity.LMStepper:
    def guarded(tokens: list[int], start_pos: int) -> np.ndarray:
        if _STOPPING.is_set():
            raise ExportError("stopped: the export failed")
        return step(tokens, start_pos)

    return guarded


def _measure_seq2seq(fmt: Any, spec: ArtifactSpec, path: Path, ref: seq2seq_parity.Reference, model: LoadedModel,
                     record: dict[str, Any]) -> dict[str, Any] | None:
    stepper = fmt.seq2seq_stepper(path, spec.backend)
    if stepper is None:
        return None
    task = model.seq2seq
    metrics = seq2seq_parity.measure(stepper, ref, task.eos_ids)
    record["generations"] = [task.tokenizer.decode(g, skip_special_tokens=True) for g in metrics.pop("generations")]
    return metrics


def golden_kind(model: LoadedModel) -> str:
    """What golden.npz holds, so validate and the device runner replay it the right way."""
    if model.language is not None:
        return "language-model"
    return "text-to-text" if model.seq2seq is not None else "tensors"


def bundle_seq2seq_files(folder: Path, task: Any) -> dict[str, Any]:
    """A text-to-text app's companions: the tokenizer (tokenizer.json, and the SentencePiece model where
    the checkpoint has one) and how to drive the two methods."""
    _save_tokenizer(folder, task.tokenizer)
    generation = {
        "decoder_start_token_id": task.start_token,
        "eos_token_ids": task.eos_ids,
        "pad_token_id": task.tokenizer.pad_token_id,
        "source_length": task.source_len,
        "max_new_tokens": task.max_target,
    }
    files.write_json(folder / "generation_config.json", generation)
    sentencepiece = None
    if task.sentencepiece is not None:
        sentencepiece = task.sentencepiece.name
        files.write_bytes(folder / sentencepiece, task.sentencepiece.read_bytes())
    return {"tokenizer": "tokenizer.json", "sentencepiece": sentencepiece, "generation_config": "generation_config.json",
            **generation}


def _save_tokenizer(folder: Path, tokenizer: Any) -> None:
    """tokenizer.json and its config beside the artifacts (transformers' legacy special_tokens_map left out)."""
    tokenizer.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)


def bundle_files(folder: Path, language: Any) -> dict[str, Any]:
    """What an app needs beside the model: tokenizer, chat template, generation defaults."""
    _save_tokenizer(folder, language.tokenizer)
    if language.chat_template:
        (folder / "chat_template.jinja").write_text(language.chat_template)
    generation = {
        "eos_token_ids": language.eos_ids,
        "bos_token_id": language.tokenizer.bos_token_id,
        "context_length": language.max_context,
        "temperature": language.generation.get("temperature", 0.7),
        "top_p": language.generation.get("top_p", 0.9),
        "top_k": language.generation.get("top_k", 50),
    }
    files.write_json(folder / "generation_config.json", generation)
    return {"tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja" if language.chat_template else None,
            "generation_config": "generation_config.json", **generation}


def _trace(model: LoadedModel) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model.module, model.sample_inputs, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export could not trace {model.name}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc


def _build_one(
    model: LoadedModel,
    program: torch.export.ExportedProgram | None,
    spec: ArtifactSpec,
    folder: Path,
    golden: Golden | lm_parity.Reference,
    key: str,
    progress: Progress,
    on_runtimes: _RuntimeCheck,
) -> ArtifactResult:
    scheme = SCHEMES[spec.quant]
    record: dict[str, Any] = {
        "name": spec.name, "file": spec.filename, "format": spec.format.value, "backend": spec.backend,
        "spec": spec.canonical(), "thresholds": {k: v for k, v in vars(spec.parity).items() if v is not None},
        "key": key,
    }
    began = time.monotonic()
    fmt = format_module(spec.format.value)
    destination = folder / spec.filename
    try:
        with files.staging(folder) as stage:
            staged = stage / spec.filename
            with progress.stage(f"{spec.filename}: {spec.settings} ({scheme.summary})"):
                built = fmt.build(model, program, spec, staged)
            return_freed_memory()
            layers = [d.as_dict() for d in built.layers]
            record["quantisation"] = {
                "scheme": spec.quant, "summary": scheme.summary, "group_size": spec.group_size,
                "quantised_layers": sum(d["quantised"] for d in layers),
                "float_layers": sum(not d["quantised"] for d in layers), "layers": layers,
            }
            record["details"] = built.details
            signature = fmt.inspect(staged)
            if spec.format.value == "pte" and model.seq2seq is not None:
                signature = signature.named(*seq2seq.signature_names(stateful=spec.backend == "coreml"))
            elif spec.format.value == "pte" and model.language is None:  # positional: the model's own order
                signature = signature.named(model.input_names, model.output_names)
            record["signature"] = signature.as_dict()
            with progress.stage(f"{spec.filename}: parity against the eager model"):
                if isinstance(golden, lm_parity.Reference):
                    metrics = _measure_language_model(fmt, spec, staged, golden, model, record, folder)
                elif isinstance(golden, seq2seq_parity.Reference):
                    metrics = _measure_seq2seq(fmt, spec, staged, golden, model, record)
                else:
                    metrics = measure(spec.format.value, spec.backend, staged, golden, model.logits_outputs,
                                      model.padding_mask)
            if metrics is None:
                shapes = built.details.get("sample_input_shapes") or [t.shape for t in model.sample_inputs]
                outputs = built.details.get("sample_output_count") or len(model.output_names)
                checks = fmt.check(staged, [tuple(s) for s in shapes], outputs, layers)
                record["structural_checks"] = checks
                passed = all(c["passed"] for c in checks)
                record["parity"] = {"pending": "numeric parity needs a Mac (Core ML runs only on macOS); "
                                               "run `edgeship validate` there", "passed": None}
                status = "pending-mac" if passed else "failed"
                if not passed:
                    record["failures"] = [c["check"] for c in checks if not c["passed"]]
            else:
                record_verdict(record, metrics, spec.parity)
                if record["status"] == "passed":
                    on_runtimes.run(spec, staged, [stage / c for c in built.companions], record, progress)
                    runtimes.judge_record(record, spec)
                status = record["status"]
            files.replace(staged, destination)
            record["companions"] = []
            for companion in built.companions:
                files.replace(stage / companion, folder / companion)
                record["companions"].append({"file": companion, "size": files.size_of(folder / companion),
                                             "sha256": files.sha256_of(folder / companion)})
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise OutputError(f"{folder}: cannot write {spec.filename} ({exc.strerror}); "
                              "free some space or choose another --output") from exc
        raise
    except ConversionError as exc:
        progress.say(f"{spec.filename}: FAILED: {exc}")
        files.remove(destination)
        record.update(status="error", error=str(exc), seconds=round(time.monotonic() - began, 2))
        return ArtifactResult(spec, "error", record)
    record.update(status=status, size=files.size_of(destination), sha256=files.sha256_of(destination),
                  seconds=round(time.monotonic() - began, 2))
    progress.say(f"{spec.filename}: {status}, {record['size'] / 1e6:.2f} MB, sha256 {record['sha256'][:12]}")
    return ArtifactResult(spec, status, record)
