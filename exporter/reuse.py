"""What an export may reuse instead of building, and why: the cache policy of the pipeline.

An artifact is reused when its key (the model's fingerprint, the artifact's spec and runtimes, the
toolchain's versions, the golden sets and the evaluation data) equals the one its record was built with,
and its files (companions too) are intact on disk. Another target's export of the same model holding the
very same artifact is copied rather than converted again. Thresholds are not in the key: a reused
artifact's stored metrics are judged again against the target's current ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files, manifest, runtimes
from .sources import LoadedModel
from .targets import ArtifactSpec
from .validate import record_verdict

GOLDEN_SETS = 4  # random input sets per tensor model; part of the key, since they decide the verdict


def artifact_key(model: LoadedModel, spec: ArtifactSpec, toolchain: dict[str, str]) -> str:
    """Everything that changes an artifact's bytes or its measured metrics; equal keys mean reuse.

    Thresholds are not in it: a changed threshold re-judges the stored metrics without a rebuild.
    """
    payload = json.dumps({"model": model.fingerprint, "spec": spec.canonical(), "golden_sets": GOLDEN_SETS,
                          "tools": toolchain, "data": data_fingerprint(), "runtimes": list(spec.runtimes)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def data_fingerprint() -> str:
    """Evaluation texts, prompts and calibration text: changing any of them changes verdicts or bytes."""
    from importlib import resources

    digest = hashlib.sha256()
    for entry in sorted(resources.files("exporter.data").iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".txt", ".json")):
            digest.update(entry.name.encode() + entry.read_bytes())
    return digest.hexdigest()


@dataclass
class Plan:
    spec: ArtifactSpec
    key: str
    reused: dict[str, Any] | None  # this folder's intact artifact with the same key
    elsewhere: tuple[Path, dict[str, Any]] | None  # another target's intact artifact with the same key

    @property
    def builds(self) -> bool:
        return self.reused is None and self.elsewhere is None


def plan(model: LoadedModel, spec: ArtifactSpec, tools: dict[str, str], folder: Path, previous: dict[str, Any] | None,
         output_root: Path, target: str) -> Plan:
    """Reuse this folder's copy, copy another target's, or build: decided once per artifact."""
    key = artifact_key(model, spec, tools)
    reused = _reusable(folder, spec, key, previous)
    elsewhere = None if reused is not None else _built_for_other_target(output_root, target, model.name, spec, key)
    return Plan(spec, key, reused, elsewhere)


def rejudge(record: dict[str, Any], spec: ArtifactSpec) -> dict[str, Any]:
    """Hold a reused artifact's stored metrics to the target's current thresholds."""
    record = dict(record, thresholds={k: v for k, v in vars(spec.parity).items() if v is not None})
    metrics = (record.get("parity") or {}).get("metrics")
    if metrics is not None and record.get("status") in ("passed", "failed"):
        record_verdict(record, metrics, spec.parity)
        runtimes.judge_record(record, spec)
    return record


def _reusable(folder: Path, spec: ArtifactSpec, key: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
    if not record or record.get("key") != key or record.get("status") not in ("passed", "failed", "pending-mac"):
        return None
    path = folder / spec.filename
    if not path.exists() or files.sha256_of(path) != record.get("sha256"):
        return None
    if not _companions_intact(folder, record):  # a .pte without its .ptd is no artifact at all
        return None
    return record


def _companions_intact(folder: Path, record: dict[str, Any]) -> bool:
    return all((folder / c["file"]).exists() and files.sha256_of(folder / c["file"]) == c["sha256"]
               for c in record.get("companions", []))


def copy_from_other_target(found: tuple[Path, dict[str, Any]], spec: ArtifactSpec,
                           folder: Path) -> tuple[str, dict[str, Any]]:
    """An identical artifact (same key: model, spec, toolchain, data) that another target's export of this
    model already built and checked: copied into this target's folder instead of converted again."""
    other, record = found
    names = [spec.filename, *(c["file"] for c in record.get("companions", []))]
    with files.staging(folder) as stage:
        for name in names:
            source = other / name
            if source.is_dir():  # a .mlpackage is a folder
                shutil.copytree(source, stage / name)
            else:
                shutil.copy2(source, stage / name)
        for name in names:
            files.replace(stage / name, folder / name)
    return other.parent.name, {**record, "copied_from_target": other.parent.name}


def _built_for_other_target(output_root: Path, target: str, model_name: str, spec: ArtifactSpec,
                            key: str) -> tuple[Path, dict[str, Any]] | None:
    """The other target's export folder and record holding this very artifact, intact (companions too)."""
    for manifest_path in sorted(output_root.glob(f"*/{model_name}/{manifest.MANIFEST}")):
        other = manifest_path.parent
        if other.parent.name == target:
            continue
        records = (manifest.read(other) or {}).get("artifacts", [])
        record = next((r for r in records if r.get("name") == spec.name and r.get("key") == key), None)
        if record is None or _reusable(other, spec, key, record) is None:
            continue
        return other, record
    return None
