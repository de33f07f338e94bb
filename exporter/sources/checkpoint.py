"""Reading a Hugging Face checkpoint folder: its JSON files, weights, name and fingerprint. Shared by
the encoder (``hf``) and decoder (``decoder``) sources, so neither imports the other for them."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
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
        with _quiet_shape_mismatch_report():
            return loader.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc) or "gguf_file" in kwargs:
            raise _unreadable(folder, present, kwargs, exc) from exc
    except (OSError, ValueError, EOFError, SafetensorError) as exc:
        raise _unreadable(folder, present, kwargs, exc) from exc
    return load_pruned(loader, folder, present, kwargs.get("dtype"))


class _DropMismatchReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "MISMATCH" not in record.getMessage()


@contextlib.contextmanager
def _quiet_shape_mismatch_report() -> Iterator[None]:
    """transformers logs a table of every weight whose shape differs from the config's before it raises;
    for a pruned checkpoint load_pruned then loads those very weights, so the table would only alarm."""
    handlers = logging.getLogger("transformers").handlers
    quiet = _DropMismatchReport()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _unreadable(folder: Path, present: list[str], kwargs: dict[str, Any], exc: BaseException) -> SourceError:
    weights = ", ".join(present) or kwargs.get("gguf_file", "")
    return SourceError(f"{folder}: cannot load the weights ({weights}); the file is truncated or corrupt? "
                       f"Re-copy or re-save the checkpoint. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def load_pruned(loader: Any, folder: Path, files: list[str], dtype: Any = None) -> nn.Module:
    """A structurally pruned checkpoint: some linear layers are narrower than its config says (MLP neurons
    or attention heads removed per layer, as structured pruning tools do, then saved with save_pretrained).
    The model is built from its config, each such linear takes the checkpoint's shape, and every weight is
    then loaded strictly: a weight the model has no place for, or a place no weight fills, is an error."""
    import torch
    from transformers import AutoConfig

    state: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(str(folder / name)))
        else:
            state.update(torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True))
    model = loader.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    own_names = set(model.state_dict())
    # A base model (AutoModel) read from a checkpoint saved with a head names its weights under the prefix.
    renamed = {key.removeprefix(prefix) if key not in own_names and key.removeprefix(prefix) in own_names else key:
               tensor for key, tensor in state.items()}
    narrowed = []
    for name, layer in list(model.named_modules()):
        weight = renamed.get(f"{name}.weight")
        if isinstance(layer, nn.Linear) and weight is not None and tuple(weight.shape) != tuple(layer.weight.shape):
            model.set_submodule(name, nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None))
            narrowed.append(name)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    model.tie_weights()
    sharing: dict[int, list[str]] = {}  # a tied weight (the lm_head's) is filled by the one it shares
    for name, parameter in model.named_parameters(remove_duplicate=False):
        sharing.setdefault(id(parameter), []).append(name)
    filled = {name for names in sharing.values() if set(names) - set(missing) for name in names}
    missing = [name for name in missing if name not in filled]
    if missing or unexpected:
        raise SourceError(f"{folder}: the weights do not fit the model its config.json describes, even with each "
                          f"linear layer taking the checkpoint's width (a structurally pruned checkpoint); "
                          f"missing: {', '.join(missing[:5]) or 'none'}; not in the model: "
                          f"{', '.join(unexpected[:5]) or 'none'}")
    if dtype is not None:
        model.to(dtype)
    model.pruned_linears = narrowed  # read by pruning_record(): the manifest's source record says it
    return model.eval()


def pruning_record(model: nn.Module) -> dict[str, list[str]]:
    """For a source record: the linear layers load_pruned gave the checkpoint's narrower shape, if any."""
    narrowed = list(getattr(model, "pruned_linears", []))
    return {"pruned_linears": narrowed} if narrowed else {}
