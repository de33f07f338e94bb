"""Files appear whole or not at all: write beside the destination, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files in sorted order (an .mlpackage is a folder). The device
    runner computes it on the device to skip files already there, so its definition is the one used."""
    from device_tests.runner import sha256  # stdlib only; the device runner cannot import the exporter

    return sha256(str(path))


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace(staged: Path, destination: Path) -> None:
    """Move a finished file or folder into place; a folder is swapped, never merged."""
    if destination.is_dir():
        old = destination.with_name(f".{destination.name}.old")
        remove(old)
        destination.rename(old)
        staged.rename(destination)
        remove(old)
    else:
        os.replace(staged, destination)


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A private folder beside the destination; removed whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(folder: Path) -> None:
    """Staging folders a killed run left behind (never reused: their contents may be partial)."""
    for stale in folder.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write next to the destination, then rename: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_bytes(path: Path, data: bytes) -> None:
    """As write_text, for bytes."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def ensure_writable(folder: Path, *, needed_bytes: int = 0) -> None:
    """Fail before heavy work if the output folder cannot be created, written, or is too full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".edgeship-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except PermissionError as exc:
        raise OutputError(f"{folder}: no permission to write here; choose another --output") from exc
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write here ({exc.strerror}); choose another --output") from exc
    free = shutil.disk_usage(folder).free
    if needed_bytes and free < needed_bytes:
        raise OutputError(
            f"{folder}: only {free / 1e6:.0f} MB free, the export needs about {needed_bytes / 1e6:.0f} MB; "
            "free some space or choose another --output"
        )
