"""A language model's export peak memory, estimated before the heavy work and held against what is free.

The whole process tree's peak (PSS: edgeship and litert-torch's child) measured by bench/export_scale.py
grows with the model's fp32 bytes on top of a fixed part, the toolchain's own code and runtimes
(docs/measurements.md "Export cost against model size"). Building artifacts one at a time (--sequential)
keeps litert-torch's child from peaking beside the .pte's lowering; an export that would not fit even so
is refused before minutes are spent on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# Fitted on two sizes (docs/measurements.md "Export cost against model size"): SmolLM2-135M (0.50 GiB of
# fp32 weights) 3.77 GiB side by side and 3.50 GiB one at a time; Llama-3.2-1B's shape (4.6 GiB) 13.99 GiB
# side by side, and 9.5 GiB for its .pte build alone (its largest phase, which one at a time does alone).
FIXED_BYTES = int(2.6 * GIB)
PER_FP32_BYTE = {"parallel": 2.5, "sequential": 1.5}  # peak bytes per fp32 byte of the model, beyond the fixed part


@dataclass(frozen=True)
class MemoryPlan:
    parallel: bool
    estimated_bytes: int
    available_bytes: int | None
    note: str | None  # what the user is told, if anything


def estimated_peak(fp32_bytes: int, parallel: bool) -> int:
    return int(FIXED_BYTES + PER_FP32_BYTE["parallel" if parallel else "sequential"] * fp32_bytes)


def available_bytes() -> int | None:
    """Memory this export may use: what the system has available plus what this process holds already
    (the loaded model is part of the estimate). None where /proc is not there (macOS): no check."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        status = Path(f"/proc/{os.getpid()}/status").read_text()
    except OSError:
        return None
    free = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    held = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return (free + held) * 1024


def plan(fp32_bytes: int, parallel: bool, builds_litert: bool, available: int | None) -> MemoryPlan:
    """Parallel as asked if it fits (or nothing can be known); sequential when only that fits; a refusal
    (ExportError) when neither does."""
    from .errors import ExportError

    wanted = estimated_peak(fp32_bytes, parallel and builds_litert)
    if available is None or wanted <= available:
        return MemoryPlan(parallel, wanted, available, None)
    sequential = estimated_peak(fp32_bytes, False)
    if sequential <= available:
        return MemoryPlan(False, sequential, available,
                          f"building one artifact at a time (as --sequential): about {wanted / GIB:.1f} GiB side by "
                          f"side, {sequential / GIB:.1f} GiB one after the other, {available / GIB:.1f} GiB available")
    raise ExportError(f"this export needs about {sequential / GIB:.1f} GiB even one artifact at a time "
                      f"(a model of {fp32_bytes / GIB:.1f} GiB in fp32) and {available / GIB:.1f} GiB is available; "
                      "free memory, or pass --no-memory-check to try anyway")
