"""Targets are data: ``targets/<name>.toml`` lists the artifacts a target gets, in order of preference.

Loading is strict, like pypa/build's config checks: an unknown key, an unknown scheme or a wrong
type fails with the file, the key and a did-you-mean hint. Adding a target means adding a file.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import TargetError
from .quant import SCHEMES, TFLITE_BLOCK_SIZES, supported_schemes
from .runtimes import RUNTIMES
from .suggest import did_you_mean

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


class Format(StrEnum):
    PTE = "pte"
    MLPACKAGE = "mlpackage"
    TFLITE = "tflite"


BACKENDS: dict[Format, tuple[str, ...]] = {
    Format.PTE: ("xnnpack", "coreml", "portable"),
    Format.MLPACKAGE: ("mlprogram",),
    Format.TFLITE: ("litert",),
}
# A tensor model (a module and its sample inputs, an encoder) or a language model (a decoder with a KV cache).
MODEL_KINDS = ("tensor", "language")
DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS15")
PRECISIONS = ("fp32", "fp16")
# Options only some formats understand; any other use is an error, not a warning.
FORMAT_OPTIONS: dict[str, set[tuple[Format, str | None]]] = {
    "compute_precision": {(Format.MLPACKAGE, None), (Format.PTE, "coreml")},
    "deployment_target": {(Format.MLPACKAGE, None), (Format.PTE, "coreml")},
    "lm_head_quant": {(Format.PTE, None)},
    "requantise": {(Format.PTE, None)},
    "embedding_quant": {(Format.PTE, "xnnpack"), (Format.PTE, "portable")},  # Core ML decoders keep float lookups
    "sparse_weights": {(Format.MLPACKAGE, None)},
}


@dataclass(frozen=True)
class Parity:
    """Thresholds an artifact must meet against the eager model on fresh inputs."""

    max_abs_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None  # argmax agreement, for outputs that are logits
    # Language models (teacher-forced next token, greedy generation).
    min_token_agreement: float | None = None
    max_mean_kl: float | None = None
    min_greedy_match: float | None = None


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    format: Format
    backend: str
    quant: str
    group_size: int | None
    compute_precision: str
    deployment_target: str | None
    skip_layers: tuple[str, ...]
    parity: Parity
    embedding_quant: str | None = None  # language models: "int8" table, or "tied" to the int8 lm_head (.ptd)
    smoothing: float | None = None  # language models: SmoothQuant alpha before int8 dynamic activations
    lm_head_quant: str | None = None  # language models: scheme for the lm_head instead of quant
    # Scheme for linears that are not carried exactly from a GGUF's 4-bit blocks (see gguf_blocks):
    # re-quantising float weights to 4 bits costs agreement that int8 keeps.
    requantise: str | None = None
    # Core ML: a weight with at least this fraction of exact zeros (an unstructured-pruned checkpoint) is stored
    # sparse, only its nonzero values and a bit mask (quantised too when the scheme quantises it).
    sparse_weights: float | None = None
    # The target's runtimes that run this format (exporter.runtimes): the artifact passes only on all of them.
    runtimes: tuple[str, ...] = ()
    # Kinds of model the artifact is built for ("tensor", "language"); an export of another kind leaves it out.
    models: tuple[str, ...] = MODEL_KINDS

    def builds_for(self, kind: str) -> bool:
        return kind in self.models

    @property
    def settings(self) -> str:
        """The backend, scheme and the options that shape the weights, as progress lines and listings show them."""
        group = f", group {self.group_size}" if self.group_size else ""
        sparse = f", sparse from {self.sparse_weights:g} zeros" if self.sparse_weights is not None else ""
        return f"{self.backend}, {self.quant}{group}{sparse}"

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.format.value}"

    def canonical(self) -> dict[str, Any]:
        """Everything that changes the artifact's bytes; used in cache keys and the manifest."""
        return {
            "name": self.name, "format": self.format.value, "backend": self.backend, "quant": self.quant,
            "group_size": self.group_size, "compute_precision": self.compute_precision,
            "deployment_target": self.deployment_target, "skip_layers": list(self.skip_layers),
            "embedding_quant": self.embedding_quant, "smoothing": self.smoothing,
            "lm_head_quant": self.lm_head_quant, "requantise": self.requantise,
            "sparse_weights": self.sparse_weights,
        }


@dataclass(frozen=True)
class Target:
    name: str
    path: Path
    description: str
    artifacts: tuple[ArtifactSpec, ...]
    sha256: str = field(repr=False)


_TOP_KEYS = {"description": str, "runtimes": list, "artifact": list}
_ARTIFACT_KEYS = {
    "name": str, "format": str, "backend": str, "quant": str, "group_size": int,
    "compute_precision": str, "deployment_target": str, "skip_layers": list, "parity": dict,
    "embedding_quant": str, "smoothing": float, "lm_head_quant": str, "requantise": str, "models": list,
    "sparse_weights": float,
}
_PARITY_KEYS = {name: float for name in Parity.__dataclass_fields__}
_EMBEDDING_QUANTS = ("int8", "tied")
# An artifact's name is the stem of the files it writes into the export folder (and onto devices).
_PLAIN_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _type_name(expected: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}[expected]


def _check_keys(table: dict[str, Any], allowed: dict[str, type], where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise TargetError(f"{where}: unknown key '{key}'{did_you_mean(key, allowed)}")
        expected = allowed[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise TargetError(f"{where}: key '{key}' must be {_type_name(expected)}, got {value!r}")


def _choice(value: str, choices: tuple[str, ...] | list[str], where: str, key: str) -> str:
    if value not in choices:
        raise TargetError(
            f"{where}: {key} '{value}' is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
        )
    return value


def _artifact(raw: dict[str, Any], where: str) -> ArtifactSpec:
    _check_keys(raw, _ARTIFACT_KEYS, where)
    for required in ("format", "quant", "parity"):
        if required not in raw:
            raise TargetError(f"{where}: missing key '{required}'")
    fmt = Format(_choice(raw["format"], [f.value for f in Format], where, "format"))
    backend = _choice(raw.get("backend", BACKENDS[fmt][0]), BACKENDS[fmt], where, "backend")
    quant = _choice(raw["quant"], list(SCHEMES), where, "quant")
    if quant not in supported_schemes(fmt.value):
        raise TargetError(
            f"{where}: quant '{quant}' is not available for .{fmt.value}; "
            f"use one of {', '.join(supported_schemes(fmt.value))}"
        )
    scheme = SCHEMES[quant]
    group_size = raw.get("group_size")
    if scheme.grouped and group_size is None:
        raise TargetError(f"{where}: quant '{quant}' needs group_size (e.g. group_size = 32)")
    if group_size is not None:
        if scheme.weight_bits is None:
            raise TargetError(f"{where}: group_size has no meaning for quant '{quant}'; remove it")
        if group_size <= 0 or group_size & (group_size - 1):
            raise TargetError(f"{where}: group_size must be a power of two, got {group_size}")
        if fmt is Format.TFLITE and group_size not in TFLITE_BLOCK_SIZES:
            raise TargetError(
                f"{where}: .tflite block-wise weights need group_size in {TFLITE_BLOCK_SIZES}, got {group_size}"
            )
    for option, allowed in FORMAT_OPTIONS.items():
        if option in raw and (fmt, None) not in allowed and (fmt, backend) not in allowed:
            raise TargetError(f"{where}: key '{option}' is not understood by .{fmt.value} ({backend}); remove it")
    precision = _choice(raw.get("compute_precision", "fp32"), PRECISIONS, where, "compute_precision")
    if quant == "fp16":
        precision = "fp16"
    deployment = raw.get("deployment_target")
    if deployment is not None:
        _choice(deployment, DEPLOYMENT_TARGETS, where, "deployment_target")
    if fmt is Format.MLPACKAGE:
        deployment = deployment or "iOS17"
        if group_size and deployment in ("iOS16", "iOS17"):
            raise TargetError(
                f"{where}: block-wise Core ML weights (group_size) need deployment_target = \"iOS18\" or later"
            )
    smoothing = raw.get("smoothing")
    if smoothing is not None:
        if not scheme.dynamic_activations:
            raise TargetError(f"{where}: smoothing only helps schemes with int8 dynamic activations, not '{quant}'; remove it")
        if not 0.0 < smoothing < 1.0:
            raise TargetError(f"{where}: smoothing is SmoothQuant's alpha and must be between 0 and 1, got {smoothing}")
    sparse_weights = raw.get("sparse_weights")
    if sparse_weights is not None:
        if not 0.0 < sparse_weights < 1.0:
            raise TargetError(f"{where}: sparse_weights is the fraction of zeros from which a weight is stored sparse "
                              f"and must be between 0 and 1 (e.g. 0.5), got {sparse_weights}")
        if scheme.weight_bits is not None and deployment in ("iOS16", "iOS17"):
            raise TargetError(f"{where}: sparse weights that are also quantised ('{quant}') need "
                              f"deployment_target = \"iOS18\" or later")
    for key in ("lm_head_quant", "requantise"):
        if key in raw:
            other = _choice(raw[key], supported_schemes(fmt.value), where, key)
            if SCHEMES[other].grouped and group_size is None:
                raise TargetError(f"{where}: {key} '{other}' needs group_size (e.g. group_size = 32)")
    embedding_quant = raw.get("embedding_quant")
    if embedding_quant is not None:
        _choice(embedding_quant, _EMBEDDING_QUANTS, where, "embedding_quant")
        if embedding_quant == "tied" and (fmt, backend) != (Format.PTE, "xnnpack"):
            raise TargetError(f"{where}: embedding_quant = \"tied\" shares the lm_head's int8 table inside an XNNPACK "
                              "program; it needs format = \"pte\" and backend = \"xnnpack\" (or use embedding_quant = \"int8\")")
    parity_raw = raw["parity"]
    _check_keys(parity_raw, _PARITY_KEYS, f"{where}: parity")
    if not parity_raw:
        raise TargetError(f"{where}: parity must set at least one threshold (e.g. min_cosine = 0.99)")
    name = raw.get("name", f"{backend}-{quant}")
    if not _PLAIN_STEM.fullmatch(name) or ".." in name:
        raise TargetError(f"{where}: name '{name}' is not a plain file name; use letters, digits, '-', '_' and '.' "
                          "(no '/', '\\' or '..'), e.g. name = \"xnnpack-int8\"")
    skip_layers = raw.get("skip_layers", [])
    if not all(isinstance(p, str) for p in skip_layers):
        raise TargetError(f"{where}: skip_layers must be a list of layer-name patterns (strings)")
    for pattern in skip_layers:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TargetError(f"{where} ({name}): skip_layers pattern '{pattern}' is not a regular expression ({exc}); "
                              "patterns are matched against whole layer names (e.g. 'lm_head'); "
                              "escape a literal '(', '[' or '.' with a backslash") from exc
    models = raw.get("models", list(MODEL_KINDS))
    if not models or not all(isinstance(k, str) for k in models) or len(set(models)) != len(models):
        raise TargetError(f"{where} ({name}): models must list each kind of model once, from {', '.join(MODEL_KINDS)}")
    for kind in models:
        _choice(kind, MODEL_KINDS, f"{where} ({name})", "models entry")
    return ArtifactSpec(
        name=name, format=fmt, backend=backend, quant=quant, group_size=group_size,
        compute_precision=precision, deployment_target=deployment, skip_layers=tuple(skip_layers),
        parity=Parity(**{k: float(v) for k, v in parity_raw.items()}), embedding_quant=embedding_quant,
        smoothing=float(smoothing) if smoothing is not None else None,
        lm_head_quant=raw.get("lm_head_quant"), requantise=raw.get("requantise"),
        sparse_weights=float(sparse_weights) if sparse_weights is not None else None,
        models=tuple(k for k in MODEL_KINDS if k in models),
    )


def _runtimes(names: list[Any], where: str) -> tuple[str, ...]:
    for name in names:
        if not isinstance(name, str):
            raise TargetError(f"{where}: runtimes must be a list of runtime names (strings), got {name!r}")
        _choice(name, list(RUNTIMES), where, "runtime")
    if len(set(names)) != len(names):
        raise TargetError(f"{where}: runtimes lists a runtime twice")
    return tuple(names)


def load_target_file(path: Path) -> Target:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read target file ({exc.strerror})") from exc
    try:
        raw = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TargetError(f"{path}: not valid TOML ({exc})") from exc
    _check_keys(raw, _TOP_KEYS, str(path))
    if not raw.get("artifact"):
        raise TargetError(f"{path}: no [[artifact]] tables; a target must list at least one artifact")
    runtimes = _runtimes(raw.get("runtimes", []), str(path))
    artifacts = []
    for index, table in enumerate(raw["artifact"], start=1):
        if not isinstance(table, dict):
            raise TargetError(f"{path}: artifact {index}: must be a table ([[artifact]])")
        spec = _artifact(table, f"{path}: artifact {index}")
        artifacts.append(replace(spec, runtimes=tuple(r for r in runtimes if spec.format.value in RUNTIMES[r].formats)))
    for name in runtimes:
        if not any(a.format.value in RUNTIMES[name].formats for a in artifacts):
            raise TargetError(f"{path}: runtime '{name}' runs {', '.join('.' + f for f in RUNTIMES[name].formats)}, "
                              "and this target has no such artifact; remove it from runtimes")
    names = [a.name for a in artifacts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TargetError(f"{path}: artifact names must be unique; '{duplicates[0]}' appears twice (set name = ...)")
    return Target(
        name=path.stem, path=path, description=raw.get("description", ""),
        artifacts=tuple(artifacts), sha256=hashlib.sha256(data).hexdigest(),
    )


def known_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_target(name_or_path: str, directory: Path = TARGETS_DIR) -> Target:
    """Load a target by name (``android``) or by path to a .toml file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise TargetError(f"target file {candidate} does not exist")
        return load_target_file(candidate)
    path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        known = known_targets(directory)
        raise TargetError(
            f"unknown target '{name_or_path}'{did_you_mean(name_or_path, known)}; "
            f"known targets: {', '.join(known)} (add one as {directory}/<name>.toml)"
        )
    return load_target_file(path)
