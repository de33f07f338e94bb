"""edgeship from Python: what ``edgeship export`` does, as a function that returns data.

    from exporter import export

    summary = export("path/to/checkpoint-or.gguf", "android")         # any --model source, a target name
    summary = export(my_module, "raspberry-pi", inputs=(torch.randn(1, 3, 96, 96),), name="my-cnn")
    summary.ok, summary.folder                                          # every artifact passed?  where
    for result in summary.results:
        result.spec.filename, result.status, result.record["parity"]["metrics"]

Errors are the CLI's: an ``exporter.errors.EdgeshipError`` subclass whose message names the file, key
or value and the fix (the CLI prints it as ``error: ...`` and exits 2). A failed parity check is not an
error: its artifact has status "failed" and ``result.record["failures"]`` says why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from .errors import SourceError
from .pipeline import ExportSummary
from .pipeline import export as _export
from .progress import Progress
from .sources import LoadedModel, SourceOptions, load_model
from .sources.factory import from_module
from .targets import Target, load_target


def export(model: str | Path | nn.Module | LoadedModel, target: str | Path | Target, output: str | Path = "dist", *,
           inputs: Any = None, name: str | None = None, only: tuple[str, ...] = (), seq_len: int | None = None,
           batch_size: int = 1, context_len: int = 512, progress: bool = False) -> ExportSummary:
    """Export ``model`` for ``target`` into ``output/<target>/<model name>/`` and check every artifact.

    ``model``: a source as ``--model`` takes it (HF folder, .gguf, .pt2, ``module:function``), or a
    ``torch.nn.Module`` with its sample ``inputs`` (a tuple or a dict of tensors) and a ``name`` for its
    folder. ``target``: a shipped target's name, a .toml path, or a loaded Target. ``only``: formats or
    artifact names to build. ``progress``: print the stage lines the CLI prints."""
    chosen = target if isinstance(target, Target) else load_target(str(target))
    if isinstance(model, nn.Module):
        if inputs is None or not name:
            raise SourceError("a model object needs its sample inputs and a name: export(module, target, "
                              "inputs=(torch.randn(...),), name=\"my-model\")")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
            raise SourceError(f"name '{name}' names the export's folder: use letters, digits, '-', '_' and '.' "
                              "(no '/', '\\' or '..')")
        loaded = from_module(model, inputs, name, {"kind": "object", "class": type(model).__qualname__},
                             what=f"model object {type(model).__qualname__}", identity=f"object:{name}",
                             code=_code_of(model))
    elif isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(str(model), SourceOptions(seq_len=seq_len, batch_size=batch_size, context_len=context_len))
    return _export(chosen, loaded, Path(output), only=tuple(only), progress=Progress(quiet=not progress))


def _code_of(model: nn.Module) -> str:
    import inspect

    try:
        return inspect.getsource(type(model))
    except (OSError, TypeError):  # defined in a notebook cell or the REPL: the weights still fingerprint it
        return ""
