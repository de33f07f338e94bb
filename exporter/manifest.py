"""manifest.json: what was exported, from what, with which tools, and how faithful each artifact is.

The device harness starts from this file and never works out paths or settings again.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ExportError

MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
SCHEMA_VERSION = 1

_TOOLS = ("edgeship", "torch", "executorch", "torchao", "coremltools", "litert-torch", "ai-edge-quantizer",
          "ai-edge-litert", "transformers", "numpy")


def toolchain() -> dict[str, str]:
    versions = {}
    for tool in _TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = "not installed"
    return versions


def read(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({exc}); delete the folder and export again") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a manifest (a JSON {type(data).__name__}, not an object); "
                          "delete the folder and export again")
    if data.get("schema") != SCHEMA_VERSION:
        return None  # written by another version: nothing in it is reused
    return data


def require(folder: Path) -> dict[str, Any]:
    data = read(folder)
    if data is None:
        raise ExportError(f"{folder}: no {MANIFEST} from this edgeship version; run `edgeship export` first")
    return data


def program_data(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The companions an artifact's program loads beside itself (.ptd data files): it counts, moves and is
    pushed with them. Other companions (a .litertlm bundle) are for apps, not for the runner."""
    return [c for c in record.get("companions", []) if c["file"].endswith(".ptd")]


def program_bytes(record: dict[str, Any]) -> int | None:
    """What an artifact's program weighs as a runner loads it: the file and its data files (None if unbuilt)."""
    return record.get("size") and record["size"] + sum(c["size"] for c in program_data(record))


def program_data_files(artifacts: list[dict[str, Any]]) -> dict[str, str]:
    """The .ptd files (name -> sha256) of these artifacts' programs."""
    return {c["file"]: c["sha256"] for record in artifacts for c in program_data(record)}
