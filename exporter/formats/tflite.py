"""TFLite / LiteRT flatbuffers (.tflite): litert-torch conversion, ai-edge-quantizer per-layer recipes.

The float flatbuffer is converted once per model and every .tflite artifact of a run is
quantised from it. Fully-connected ops are matched to torch layers by their weight values, because
LiteRT's tensor names keep only class names and the last attribute (``Blk_0/Linear_fc``), and the
converter folds neighbouring scales (LayerNorm gamma, attention scaling) into the weights.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError
from ..quant import SCHEMES, LayerDecision, library_config, plan_layers
from ..sources import LoadedModel
from ..targets import ArtifactSpec
from . import Built, Runner, Signature, TensorSpec

_float_cache: dict[str, bytes] = {}  # model fingerprint -> float flatbuffer, shared by this run's artifacts


_SIGNATURE_POINTS = 2048


def weight_signature(weight: np.ndarray) -> np.ndarray:
    """A fingerprint of a weight matrix that survives per-row and per-column rescaling (and sign flips).

    Alternately normalising |W|'s columns and rows converges to the same matrix for W and D1 W D2,
    so a layer whose LayerNorm gamma was folded in still matches its torch weights.
    """
    a = np.abs(np.asarray(weight, np.float64)) + 1e-12
    for _ in range(4):
        a /= a.sum(axis=0, keepdims=True)
        a /= a.sum(axis=1, keepdims=True)
    flat = a.ravel()
    points = np.random.default_rng(0).choice(flat.size, size=min(_SIGNATURE_POINTS, flat.size), replace=False)
    sample = flat[np.sort(points)]
    return (sample - sample.mean()) / (sample.std() + 1e-30)


def match_layers(ops: list[dict[str, Any]], layers: dict[str, np.ndarray]) -> dict[str, str]:
    """Op scope -> torch layer name, one-to-one, by best signature correlation among equal shapes."""
    signatures = {name: weight_signature(w) for name, w in layers.items()}
    pairs = []
    for op in ops:
        for name, weight in layers.items():
            if tuple(weight.shape) == op["shape"]:
                score = float(np.dot(op["signature"], signatures[name]) / len(op["signature"]))
                if score > 0.95:
                    pairs.append((score, op["scope"], name))
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for score, scope, name in sorted(pairs, reverse=True):
        if scope not in matched and name not in taken:
            matched[scope] = name
            taken.add(name)
    return matched


def float_flatbuffer(model: LoadedModel, spec: ArtifactSpec) -> bytes:
    if model.fingerprint not in _float_cache:
        import litert_torch

        try:
            converted = litert_torch.convert(model.module, model.sample_inputs)
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConversionError(spec.filename, f"litert-torch could not convert the model: {text}") from exc
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "float.tflite"
            converted.export(str(path))
            _float_cache[model.fingerprint] = path.read_bytes()
    return _float_cache[model.fingerprint]


def _interpreter(model_content: bytes | None = None, path: Path | None = None) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content) if model_content else Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def fully_connected_ops(flatbuffer: bytes) -> list[dict[str, Any]]:
    """Each FULLY_CONNECTED op of a float model: its output tensor name, weight digest and shape."""
    interpreter = _interpreter(model_content=flatbuffer)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = []
    for op in interpreter._get_ops_details():
        if op["op_name"] != "FULLY_CONNECTED":
            continue
        weight = tensors[int(op["inputs"][1])]
        try:
            values = interpreter.get_tensor(weight["index"])
        except ValueError:  # computed, not constant
            continue
        ops.append({"scope": tensors[int(op["outputs"][0])]["name"], "signature": weight_signature(values),
                    "shape": tuple(int(s) for s in weight["shape"])})
    return ops


def build(model: LoadedModel, program: torch.export.ExportedProgram, spec: ArtifactSpec, destination: Path) -> Built:
    scheme = SCHEMES[spec.quant]
    plan = plan_layers(model.module, scheme, spec.group_size, spec.skip_layers)
    flatbuffer = float_flatbuffer(model, spec)
    if scheme.weight_bits is None:
        destination.write_bytes(flatbuffer)
        return Built(layers=plan)
    weights = {name: m.weight.detach().numpy() for name, m in model.module.named_modules()
               if isinstance(m, torch.nn.Linear)}
    ops = fully_connected_ops(flatbuffer)
    layer_of = match_layers(ops, weights)
    chosen = {d.name for d in plan if d.quantised}
    selected = [op for op in ops if layer_of.get(op["scope"]) in chosen]
    quantised_bytes = _quantise(flatbuffer, selected, library_config("tflite", spec.quant, spec.group_size), spec)
    destination.write_bytes(quantised_bytes)
    scopes = quantised_scopes(quantised_bytes)
    found = {layer_of[op["scope"]] for op in selected if op["scope"] in scopes}
    layers = []
    for decision in plan:
        if decision.quantised and decision.name not in found:
            decision = LayerDecision(decision.name, decision.kind, decision.shape, False,
                                     "no quantised FULLY_CONNECTED weight found for it in the flatbuffer")
        layers.append(decision)
    return Built(layers=layers, details={"fully_connected_ops": len(ops)})


def _quantise(flatbuffer: bytes, ops: list[dict[str, Any]], config: dict[str, Any], spec: ArtifactSpec) -> bytes:
    from ai_edge_quantizer import quantizer, recipe_manager
    from ai_edge_quantizer.qtyping import TFLOperationName

    manager = recipe_manager.RecipeManager()
    for op in ops:
        # One recipe entry per chosen op, matched on its output tensor (the quantizer's "scope").
        regex = "^" + re.escape(op["scope"]) + ";"
        add = manager.add_dynamic_config if config["dynamic"] else manager.add_weight_only_config
        add(regex=regex, operation_name=TFLOperationName.FULLY_CONNECTED,
            num_bits=config["num_bits"], granularity=config["granularity"])
    try:
        q = quantizer.Quantizer(flatbuffer)
        q.load_quantization_recipe(manager.get_quantization_recipe())
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a size report of its own
            return bytes(q.quantize().quantized_model)
    except Exception as exc:
        raise ConversionError(spec.filename, f"ai-edge-quantizer failed: {str(exc).splitlines()[0][:300]}") from exc


def quantised_scopes(flatbuffer: bytes) -> set[str]:
    """Output names of FULLY_CONNECTED ops whose weight is stored as integers.

    Dynamic-range ops read the int8 tensor directly; weight-only ops read it through a DEQUANTIZE op.
    """
    interpreter = _interpreter(model_content=flatbuffer)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    dequantized_from = {int(op["outputs"][0]): int(op["inputs"][0]) for op in ops if op["op_name"] == "DEQUANTIZE"}

    def stored_as_integers(index: int) -> bool:
        index = dequantized_from.get(index, index)
        return np.dtype(tensors[index]["dtype"]).kind in "iu"

    return {tensors[int(op["outputs"][0])]["name"] for op in ops
            if op["op_name"] == "FULLY_CONNECTED" and stored_as_integers(int(op["inputs"][1]))}


def load(path: Path, backend: str = "litert") -> Runner:
    interpreter = _interpreter(path=path)
    runner = interpreter.get_signature_runner()
    inputs = runner.get_input_details()
    order = sorted(inputs, key=lambda k: int(re.sub(r"\D", "", k) or 0))
    outputs = sorted(runner.get_output_details(), key=lambda k: int(re.sub(r"\D", "", k) or 0))

    def run(values: list[np.ndarray]) -> list[np.ndarray]:
        feed = {name: np.asarray(v).astype(inputs[name]["dtype"]) for name, v in zip(order, values)}
        result = runner(**feed)
        return [np.asarray(result[name]) for name in outputs]

    return run


def inspect(path: Path) -> Signature:
    interpreter = _interpreter(path=path)
    runner = interpreter.get_signature_runner()

    def specs(details: dict[str, Any]) -> tuple[TensorSpec, ...]:
        ordered = sorted(details, key=lambda k: int(re.sub(r"\D", "", k) or 0))
        return tuple(TensorSpec(k, np.dtype(details[k]["dtype"]).name, tuple(int(s) for s in details[k]["shape"]))
                     for k in ordered)

    return Signature(specs(runner.get_input_details()), specs(runner.get_output_details()))
