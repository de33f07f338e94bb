"""Returning freed memory to the system between the export's phases."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory() -> None:
    """Collect garbage and give the freed heap back to the system: glibc keeps it otherwise (tensors of a
    few MB live in its arenas), and the next phase, or litert-torch's child, would stack its peak on top of
    the last one's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators return memory themselves
        pass
