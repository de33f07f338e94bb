"""Compare an artifact's outputs with the eager model's and check them against the target's thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .targets import Parity

Outputs = Sequence[np.ndarray]


def compare(
    expected: Sequence[Outputs],
    actual: Sequence[Outputs],
    output_names: Sequence[str],
    logits_outputs: frozenset[str] = frozenset(),
    masks: Sequence[np.ndarray | None] | None = None,
) -> dict[str, float]:
    """max abs error and worst cosine over every output of every input set; top-1 over logits outputs.

    ``masks`` (one per input set, [batch, seq]) drop padded positions from outputs shaped
    [batch, seq, ...]: what a model computes for padding is never used, so it is not compared.
    """
    max_abs, cosines, agree, total = 0.0, [], 0, 0
    masks = masks or [None] * len(expected)
    for want_set, got_set, mask in zip(expected, actual, masks, strict=True):
        for name, want, got in zip(output_names, want_set, got_set, strict=True):
            want64, got64 = np.asarray(want, np.float64), np.asarray(got, np.float64).reshape(np.shape(want))
            if mask is not None and want64.ndim >= 2 and want64.shape[:2] == mask.shape:
                keep = mask.astype(bool)
                want64, got64 = want64[keep], got64[keep]
            max_abs = max(max_abs, float(np.max(np.abs(want64 - got64))) if want64.size else 0.0)
            cosines.append(cosine(want64, got64))
            if name in logits_outputs:
                agree += int(np.sum(want64.argmax(-1) == got64.argmax(-1)))
                total += want64.argmax(-1).size
    metrics = {"max_abs_error": max_abs, "cosine": min(cosines) if cosines else 1.0}
    if total:
        metrics["top1"] = agree / total
    return metrics


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norm)


@dataclass(frozen=True)
class Check:
    metric: str
    measured: float
    required: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "measured": self.measured, "required": self.required, "passed": self.passed}

    def describe(self) -> str:
        relation = "<=" if self.metric.startswith("max") else ">="
        return f"{self.metric} {self.measured:.4g} (required {relation} {self.required:.4g})"


# threshold field -> (measured metric, higher is better)
_THRESHOLDS = {
    "max_abs_error": ("max_abs_error", False),
    "min_cosine": ("cosine", True),
    "min_top1": ("top1", True),
    "min_token_agreement": ("token_agreement", True),
    "max_mean_kl": ("mean_kl", False),
    "min_greedy_match": ("greedy_match", True),
}


def check(metrics: dict[str, float], parity: Parity) -> tuple[list[Check], list[str]]:
    """A Check per threshold the target sets, and the thresholds whose metric this model does not have.

    A target applies to any model: top-1 means nothing for an embedding model, so that threshold is
    recorded as not applicable (never as passed).
    """
    checks, not_applicable = [], []
    for field, (metric, higher_is_better) in _THRESHOLDS.items():
        required = getattr(parity, field)
        if required is None:
            continue
        measured = metrics.get(metric)
        if measured is None:
            not_applicable.append(field)
            continue
        passed = measured >= required if higher_is_better else measured <= required
        checks.append(Check(field, measured, required, passed))
    return checks, not_applicable
