"""A module's weights moved to a file while a long build works on a copy of them, then brought back.

The .pte build deep-copies the fp32 source model and spends minutes lowering the copy; meanwhile the
original (0.54 GB for SmolLM2-135M) sat idle in memory while litert-torch's child process peaked beside it.
Parked, the parameters are empty tensors and their values wait in a file (the page cache, which the
kernel may drop), so the export's processes fit in less memory together (docs/language-models.md "How an export uses memory").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .heap import return_freed_memory


@contextmanager
def parked(module: torch.nn.Module, folder: Path) -> Iterator[None]:
    """Inside the block the module's parameters hold no values; on leaving (normally or by an error)
    every parameter gets its own values back, tied parameters still one object. ``folder`` should be a
    staging folder on disk (it is cleaned up if the process dies inside the block)."""
    parameters = dict(module.named_parameters())  # tied weights once
    path = Path(folder) / f".parked-{os.getpid()}-{id(module)}.pt"
    try:
        torch.save({name: p.detach() for name, p in parameters.items()}, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        for parameter in parameters.values():
            parameter.data = torch.empty(0, dtype=parameter.dtype)
        return_freed_memory()  # the weights' pages, not just their Python objects
        yield
    finally:
        saved = torch.load(path, weights_only=True)
        for name, parameter in parameters.items():
            parameter.data = saved[name]
        path.unlink()
