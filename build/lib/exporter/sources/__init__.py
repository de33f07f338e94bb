"""Model sources: turn what the user points at into one ``LoadedModel``.

Each source module exposes ``load(spec, options) -> LoadedModel``; ``load_model`` picks the source
from the shape of the argument. Language-model sources (HF decoder folders, GGUF) slot in here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError
from .base import LoadedModel, SourceOptions


def load_model(spec: str, options: SourceOptions | None = None) -> LoadedModel:
    options = options or SourceOptions()
    path = Path(spec)
    if path.suffix == ".pt2":
        from . import pt2

        return pt2.load(path, options)
    if path.suffix == ".gguf":
        from . import decoder

        return decoder.load_gguf(path, options)
    if path.is_dir():
        from . import hf

        return hf.load(path, options)
    if ":" in spec:
        from . import factory

        return factory.load(spec, options)
    if path.suffix == ".py" or "/" in spec:
        raise SourceError(f"{spec}: no such file or folder")
    raise SourceError(
        f"cannot tell what '{spec}' is: give a Hugging Face checkpoint folder, a .gguf or .pt2 file, "
        "or a factory as module.path:function or path/to/file.py:function"
    )


__all__ = ["LoadedModel", "SourceOptions", "load_model"]
