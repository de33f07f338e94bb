"""Parity of artifacts against the eager model, run on their real runtimes with the golden inputs.

Used right after each artifact is built, and again by ``edgeship validate`` on an existing folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import parity
from .errors import ExportError
from .formats import format_module
from .sources import LoadedModel
from .targets import Parity


@dataclass
class Golden:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    inputs: list[list[np.ndarray]]
    outputs: list[list[np.ndarray]]

    def save(self, path: Path) -> None:
        arrays = {}
        for index, (ins, outs) in enumerate(zip(self.inputs, self.outputs)):
            arrays.update({f"set{index}.input.{n}": v for n, v in zip(self.input_names, ins)})
            arrays.update({f"set{index}.output.{n}": v for n, v in zip(self.output_names, outs)})
        partial = path.with_name(f".{path.name}.partial.npz")
        np.savez(partial, **arrays)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path, input_names: list[str], output_names: list[str]) -> Golden:
        try:
            data = np.load(path)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path}: cannot read the golden inputs ({exc}); export again") from exc
        count = len({k.split(".")[0] for k in data.files})
        return cls(
            tuple(input_names), tuple(output_names),
            [[data[f"set{i}.input.{n}"] for n in input_names] for i in range(count)],
            [[data[f"set{i}.output.{n}"] for n in output_names] for i in range(count)],
        )


def make_golden(model: LoadedModel, count: int) -> Golden:
    """Eager outputs on fresh inputs: the reference every artifact, here or on a device, is held to."""
    inputs, outputs = [], []
    with torch.no_grad():
        for values in model.fresh_inputs(count):
            result = model.module(*values)
            inputs.append([v.numpy() for v in values])
            outputs.append([r.detach().float().numpy() if r.is_floating_point() else r.numpy() for r in result])
    return Golden(model.input_names, model.output_names, inputs, outputs)


def measure(fmt: str, backend: str, path: Path, golden: Golden, logits_outputs: frozenset[str],
            padding_mask: str | None = None) -> dict[str, Any] | None:
    """Run the artifact on the golden inputs; None if its runtime does not exist on this host."""
    runner = format_module(fmt).load(path, backend)
    if runner is None:
        return None
    actual = [runner(list(inputs)) for inputs in golden.inputs]
    masks = None
    if padding_mask in golden.input_names:
        index = golden.input_names.index(padding_mask)
        masks = [inputs[index] for inputs in golden.inputs]
    return parity.compare(golden.outputs, actual, golden.output_names, logits_outputs, masks)


def record_verdict(record: dict[str, Any], metrics: dict[str, Any], thresholds: Parity) -> None:
    """Judge measured metrics against thresholds and write parity, status and failures into a manifest record."""
    record["parity"] = judge(metrics, thresholds)
    record["status"] = "passed" if record["parity"]["passed"] else "failed"
    record["failures"] = record["parity"]["failures"]


def judge(metrics: dict[str, float], thresholds: Parity) -> dict[str, Any]:
    checks, not_applicable = parity.check(metrics, thresholds)
    return {
        "metrics": metrics,
        "checks": [c.as_dict() for c in checks],
        "not_applicable": not_applicable,
        "passed": bool(checks) and all(c.passed for c in checks),
        "failures": [c.describe() for c in checks if not c.passed]
        or ([] if checks else ["no threshold of the target applies to this model's outputs"]),
    }
