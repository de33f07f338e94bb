"""A saved ``torch.export`` program (.pt2): already traced, so it is reused as is."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SourceError
from .base import LoadedModel, SourceOptions, file_sha256, fingerprint, prepare


def load(path: Path, options: SourceOptions) -> LoadedModel:
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a bad archive
        raise SourceError(f"{path}: not a readable torch.export program ({type(exc).__name__}: {exc}); "
                          "save one with torch.export.save(torch.export.export(model, inputs), path)") from exc
    args, kwargs = program.example_inputs or ((), {})
    if kwargs:
        raise SourceError(f"{path}: programs exported with keyword inputs are not supported; export with positional inputs")
    if not args:
        raise SourceError(f"{path}: the program carries no example inputs; re-save it with torch 2.3 or later")
    module, names, values, outputs = prepare(program.module(), tuple(args), what=str(path))
    return LoadedModel(
        name=path.stem, module=module, input_names=names, output_names=outputs, sample_inputs=values,
        source={"kind": "pt2", "path": str(path.resolve())},
        fingerprint=fingerprint(file_sha256(path)),
        logits_outputs=frozenset(n for n in outputs if "logits" in n),
        program=program,
    )
