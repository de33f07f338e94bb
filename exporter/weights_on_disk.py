"""A module's weights moved to a file while the builds work on copies of them, then brought back.

Each artifact's build changes a copy of the fp32 source model (smoothing, quantisation) and spends minutes
lowering it; meanwhile the original (0.54 GB for SmolLM2-135M, 4.9 GB for a 1.2B model) would sit idle in
memory beside the copy and beside litert-torch's child process. Parked, the parameters are empty tensors
and their values wait in a file; copies map that file (copy-on-write), so a copy's untouched weights are
page cache the kernel may drop, not a second model in memory (docs/language-models.md "How an export uses memory").
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .heap import return_freed_memory


_MAPPED: set[int] = set()  # storages of working copies that live in a parked file's mapping


def own_memory(module: torch.nn.Module) -> None:
    """Give a working copy's tensors that still live in the parked file's mapping memory of their own.

    The mapping (and every page of it that was read or written) lives as long as any tensor in it: once
    a build has quantised its copy, the few float tensors left (norms, biases) would keep the whole fp32
    model mapped, 4.9 GB for a 1.2B model, through its lowering."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.numel() and tensor.untyped_storage().data_ptr() in _MAPPED:
            tensor.data = tensor.data.clone()


@contextmanager
def parked(module: torch.nn.Module, folder: Path) -> Iterator[Callable[[], torch.nn.Module]]:
    """Inside the block the module's parameters hold no values, and the block gets a function that makes
    working copies of the module with its values (mapped from the file); on leaving (normally or by an
    error) every parameter gets its own values back, tied parameters still one object. ``folder`` should
    be a staging folder on disk (it is cleaned up if the process dies inside the block)."""
    parameters = dict(module.named_parameters())  # tied weights once
    path = Path(folder) / f".parked-{os.getpid()}-{id(module)}.pt"
    try:
        torch.save({name: p.detach() for name, p in parameters.items()}, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise

    def working_copy() -> torch.nn.Module:
        twin = copy.deepcopy(module)  # empty parameters: only the structure, buffers and config are copied
        mapped = torch.load(path, weights_only=True, mmap=True)
        _MAPPED.update(t.untyped_storage().data_ptr() for t in mapped.values())
        for name, parameter in twin.named_parameters():  # a tied parameter is one object here too
            parameter.data = mapped[name]
        return twin

    try:
        for parameter in parameters.values():
            parameter.data = torch.empty(0, dtype=parameter.dtype)
        return_freed_memory()  # the weights' pages, not just their Python objects
        yield working_copy
    finally:
        saved = torch.load(path, weights_only=True)
        for name, parameter in parameters.items():
            parameter.data = saved[name]
        path.unlink()
