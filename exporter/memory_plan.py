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
# At or above every measurement (docs/measurements.md "Export cost against model size"). Side by side,
# four shapes in three runs, 135M to 1.24B (0.50 to 4.6 GiB of fp32 weights): 3.49-3.75, 6.30-6.47,
# 7.07-7.40 and 10.62-11.31 GiB, and the default model's 4.9 GiB; the peak grows less than linearly, so
# the line runs above the small sizes. One at a time, three shapes: 3.50 GiB (135M), 9.85 GiB (1.24B) and
# 21.56 GiB (Phi-3-mini's 3.82B, 14.2 GiB in fp32: its eager reference, the fp32 model beside the bf16
# checkpoint's mapped pages), a line through the two larger.
FIXED_BYTES = {"parallel": int(4.8 * GIB), "sequential": int(4.4 * GIB)}
PER_FP32_BYTE = {"parallel": 1.45, "sequential": 1.22}  # peak bytes per fp32 byte of the model, beyond the fixed part


@dataclass(frozen=True)
class MemoryPlan:
    parallel: bool
    estimated_bytes: int
    available_bytes: int | None
    note: str | None  # what the user is told, if anything


def _line(fp32_bytes: int, mode: str) -> int:
    return int(FIXED_BYTES[mode] + PER_FP32_BYTE[mode] * fp32_bytes)


def estimated_peak(fp32_bytes: int, parallel: bool) -> int:
    """Side by side never needs less than one at a time (the two lines cross beyond the measured sizes)."""
    sequential = _line(fp32_bytes, "sequential")
    return max(_line(fp32_bytes, "parallel"), sequential) if parallel else sequential


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


def parameters_on_disk(spec: str) -> int | None:
    """The parameter count a checkpoint folder's safetensors files or a GGUF file declare, read from their
    headers (no weight is read); None for other sources."""
    import math

    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        import gguf

        try:
            return sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(str(path)).tensors)
        except Exception:  # a damaged file: the source's own check names what is wrong
            return None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    try:
        for file in files:
            with safe_open(str(file), "pt") as handle:
                total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except Exception:  # a damaged file: the source's own check names what is wrong
        return None
    return total


def refuse_before_loading(spec: str, builds_litert: bool) -> None:
    """Refuse, before the model is loaded, an export that cannot fit even one artifact at a time (its eager
    reference alone computes in fp32: 15 GB for a 3.8B checkpoint); the plan after loading decides the rest."""
    count = parameters_on_disk(spec)
    available = available_bytes()
    if count is not None and available is not None:
        plan(4 * count, False, builds_litert, available)
