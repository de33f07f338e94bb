"""Reading a Hugging Face checkpoint folder: its JSON files, weights, name and fingerprint. Shared by
the encoder (``hf``) and decoder (``decoder``) sources, so neither imports the other for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SourceError
from .base import file_sha256, fingerprint

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path, shape: type = dict) -> Any:
    """A JSON file of the checkpoint, checked to hold a JSON object (or list) before anything reads a key."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise SourceError(f"{path}: not valid JSON ({exc}); the file is cut short or damaged: re-copy or "
                          "re-save the checkpoint (save_pretrained)") from exc
    if not isinstance(data, shape):
        expected = "a JSON object {...}" if shape is dict else "a JSON list [...]"
        raise SourceError(f"{path}: must hold {expected}, not a {type(data).__name__}; re-copy or re-save the "
                          "checkpoint (save_pretrained)")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    return read_json(config_path)


def weights_fingerprint(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return fingerprint(*(f"{p.name}:{file_sha256(p)}" for p in files))


def model_name(folder: Path) -> str:
    """The folder's name, or its parent's when the folder is just called ``model`` (as in pip packages)."""
    folder = folder.resolve()
    generic = {"model", "models", "checkpoint", "hf", "weights"}
    name = folder.parent.name if folder.name.lower() in generic else folder.name
    return name.replace("_", "-")


def load_weights_checked(loader: Any, folder: Path, **kwargs: Any) -> nn.Module:
    """Call a from_pretrained, turning a truncated or corrupt weights file into a SourceError."""
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    present += [p.name for p in folder.glob("model-*.safetensors")]
    if not present and "gguf_file" not in kwargs:
        raise SourceError(f"{folder}: no weights (expected {' or '.join(WEIGHT_FILES)})")
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:
        weights = ", ".join(present) or kwargs.get("gguf_file", "")
        raise SourceError(
            f"{folder}: cannot load the weights ({weights}); the file is truncated or corrupt? "
            f"Re-copy or re-save the checkpoint. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
