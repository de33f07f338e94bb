"""A Python factory, ``module.path:function`` or ``path/to/file.py:function``, returning (model, inputs)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import SourceError
from .base import LoadedModel, SourceOptions, fingerprint, prepare


def _import(target: str) -> ModuleType:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SourceError(f"{target}: no such file")
        spec = importlib.util.spec_from_file_location(f"edgeship_factory_{path.stem}", path)
        assert spec and spec.loader  # spec_from_file_location only returns None for non-.py paths
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise SourceError(f"{target}: importing it failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise SourceError(f"cannot import module '{target}' ({exc}); is it installed or on PYTHONPATH?") from exc
    except Exception as exc:
        raise SourceError(f"importing '{target}' failed: {type(exc).__name__}: {exc}") from exc


def _model_name(module_part: str, function_name: str) -> str:
    """``models.py:build_bert`` -> ``bert``; a generic ``build`` falls back to the module's name."""
    name = function_name.removeprefix("build_").removeprefix("make_")
    if name in ("build", "make", "model", "create", "get_model"):
        name = Path(module_part).stem if module_part.endswith(".py") else module_part.rsplit(".", 1)[-1]
    return name.replace("_", "-")


def load(spec: str, options: SourceOptions) -> LoadedModel:
    module_part, _, function_name = spec.rpartition(":")
    if not module_part or not function_name:
        raise SourceError(f"'{spec}': a factory is written module.path:function or path/to/file.py:function")
    module = _import(module_part)
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise SourceError(f"'{spec}': {module_part} has no function '{function_name}'")
    try:
        result = factory()
    except Exception as exc:
        raise SourceError(f"factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise SourceError(
            f"factory '{spec}' returned {type(result).__name__}; it must return (model, sample_inputs) "
            "where sample_inputs is a tuple of tensors or a dict of tensors"
        )
    model, inputs = result
    return from_module(model, inputs, _model_name(module_part, function_name), {"kind": "factory", "spec": spec},
                       what=f"factory '{spec}'", identity=spec, code=_source_of(module))


def from_module(model: Any, inputs: Any, name: str, source: dict[str, Any], *, what: str, identity: str,
                code: str) -> LoadedModel:
    """A model object and its sample inputs (a tuple or a dict of tensors), as every source hands them on.
    Its fingerprint covers where it came from, its code, weights and inputs: a changed model is never reused."""
    flat, names, values, outputs = prepare(model, inputs, what=what)
    return LoadedModel(
        name=name, module=flat, input_names=names, output_names=outputs, sample_inputs=values, source=source,
        fingerprint=fingerprint(identity, code, tensors={**model.state_dict(), **{f"in:{n}": v for n, v in zip(names, values)}}),
        logits_outputs=frozenset(n for n in outputs if "logits" in n),
    )


def _source_of(thing: Any) -> str:
    try:
        return inspect.getsource(thing)
    except (OSError, TypeError):
        return ""
