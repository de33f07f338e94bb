"""Returning freed memory to the system between the export's phases, and saying when a build's float
working copy is gone."""

from __future__ import annotations

import ctypes
import gc
import threading

# Set while no build in this process holds a float working copy of the model: an artifact finished beside
# the build (exporter.pipeline) waits for it, as the copy is a large model's peak (a 1.2B model's .pte
# build holds 7.6 GiB while it smooths and quantises its copy, 2.4 GiB once the copy is quantised).
FLOAT_COPY_RELEASED = threading.Event()
FLOAT_COPY_RELEASED.set()


def float_copy_released() -> None:
    """A build calls this once its float working copy is quantised and let go."""
    FLOAT_COPY_RELEASED.set()


def return_freed_memory() -> None:
    """Collect garbage and give the freed heap back to the system: glibc keeps it otherwise (tensors of a
    few MB live in its arenas), and the next phase, or litert-torch's child, would stack its peak on top of
    the last one's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators return memory themselves
        pass
