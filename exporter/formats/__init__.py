"""One module per artifact format, listed in one table and imported only when used.

Each format module exposes:
  build(model, program, spec, destination) -> Built     write the artifact
  load(path) -> Runner | None                            a runner on this host, or None if it cannot run here
  inspect(path) -> Signature                             the artifact's own inputs and outputs
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from ..quant import LayerDecision

FORMAT_MODULES = {
    "pte": "exporter.formats.pte",
    "mlpackage": "exporter.formats.mlpackage",
    "tflite": "exporter.formats.tflite",
}


def format_module(fmt: str) -> ModuleType:
    return importlib.import_module(FORMAT_MODULES[fmt])


@dataclass
class Built:
    """What a format reports about the artifact it wrote."""

    layers: list[LayerDecision]
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific facts for the manifest
    checks: list[dict[str, Any]] = field(default_factory=list)  # structural checks (Core ML on Linux)
    companions: list[str] = field(default_factory=list)  # extra files written beside the artifact


class Runner(Protocol):
    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    def named(self, inputs: Sequence[str], outputs: Sequence[str]) -> Signature:
        """A positional signature (a .pte method's) described with the model's names, which it takes in order."""
        if (len(inputs), len(outputs)) != (len(self.inputs), len(self.outputs)):
            return self
        return Signature(tuple(replace(t, name=n) for t, n in zip(self.inputs, inputs)),
                         tuple(replace(t, name=n) for t, n in zip(self.outputs, outputs)))
