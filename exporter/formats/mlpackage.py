"""Core ML packages (.mlpackage): coremltools conversion of the shared torch.export program.

Core ML cannot execute on Linux, so ``load`` returns None and the pipeline marks numeric parity as
pending a Mac; ``check`` verifies everything that can be verified here instead.
"""

from __future__ import annotations

import platform
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..quant import SCHEMES, LayerDecision, confirm, library_config, linears_not_called, plan_layers
from ..sources import LoadedModel
from ..targets import DEPLOYMENT_TARGETS, ArtifactSpec
from . import Built, Runner, Signature, TensorSpec

_WEIGHT_OPS = ("linear", "matmul", "conv")
_SPARSE_OP = "constexpr_sparse_to_dense"


def _mil_name(torch_name: str) -> str:
    """torch.export names a parameter ``a.B.weight`` as ``p_a_b_weight`` (lower case: T5's ``SelfAttention``);
    coremltools keeps that stem."""
    return ("p_" + torch_name.replace(".", "_") + "_weight").lower()


def _decompositions() -> dict[Any, Any]:
    """Ops coremltools' torch.export frontend has no converter for, written as ones it has
    (transformers' encoders build their attention masks with ``new_ones`` and ``&``; Phi-3's
    graph holds an ``alias``, a view of the whole tensor, which a copy computes the same)."""
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    table = get_decompositions([aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty])
    table[aten.__and__.Tensor] = lambda a, b: aten.bitwise_and.Tensor(a, b)
    table[aten.__or__.Tensor] = lambda a, b: aten.bitwise_or.Tensor(a, b)
    table[aten.alias.default] = lambda a: aten.clone.default(a)
    return table


def convert(program: torch.export.ExportedProgram, spec: ArtifactSpec) -> Any:
    import coremltools as ct

    try:
        return ct.convert(
            program.run_decompositions(_decompositions()),
            minimum_deployment_target=getattr(ct.target, spec.deployment_target or "iOS17"),
            compute_precision=ct.precision.FLOAT16 if spec.compute_precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=True,
        )
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        ops = re.findall(r"(?:op|node)s? '?([\w.:]+)'?", text)
        where = f" (op {ops[0]})" if ops else ""
        raise ConversionError(spec.filename, f"coremltools could not convert the model{where}: {text}") from exc


def compressed_weights(mlmodel: Any) -> dict[str, tuple[str, ...]]:
    """MIL weight names that feed a linear/matmul/conv through constexpr (compressed) ops -> the chain of
    constexpr op types, outermost first (a sparse quantised weight: sparse_to_dense, then the dequantisation)."""
    found: dict[str, tuple[str, ...]] = {}
    function = mlmodel._mil_program.functions["main"]

    def chain(op: Any) -> tuple[str, ...]:
        types = []
        while op is not None:
            types.append(op.op_type)
            op = next((v.op for v in op.inputs.values()
                       if getattr(v, "op", None) is not None and v.op.op_type.startswith("constexpr_")), None)
        return tuple(types)

    def visit(block: Any) -> None:
        for op in block.operations:
            for inner in getattr(op, "blocks", []):
                visit(inner)
            if not op.op_type.startswith(_WEIGHT_OPS):
                continue
            for value in op.inputs.values():
                producer = getattr(value, "op", None)
                if producer is not None and producer.op_type.startswith("constexpr_"):
                    found[producer.name] = chain(producer)

    visit(function)
    return found


def build(model: LoadedModel, program: torch.export.ExportedProgram | None, spec: ArtifactSpec, destination: Path) -> Built:
    if model.seq2seq is not None:
        return build_seq2seq(model, spec, destination)
    if model.language is not None:
        return build_decoder(model, spec, destination)
    assert program is not None  # the pipeline traces once for every non-language model
    plan = plan_layers(model.module, SCHEMES[spec.quant], spec.group_size, spec.skip_layers)
    mlmodel, layers = _compress(convert(program, spec), plan, spec)
    _save(_named_features(mlmodel, model.input_names, model.output_names), spec, destination)
    return Built(layers=layers, details={"deployment_target": spec.deployment_target,
                                         "compute_precision": spec.compute_precision})


def _named_features(mlmodel: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
    """The package's features named after the model's inputs and outputs (the converter names them after
    the traced graph's nodes, ``x`` or ``linear_3``), so an app feeds them by the names it knows."""
    import coremltools as ct

    spec = mlmodel.get_spec()
    current = [f.name for f in spec.description.input], [f.name for f in spec.description.output]
    wanted = list(inputs), list(outputs)
    if [len(c) for c in current] != [len(w) for w in wanted] or len(set(wanted[0] + wanted[1])) != len(wanted[0] + wanted[1]):
        return mlmodel
    # through placeholder names, so that swapping two names never meets a name still in use
    placeholders = [[f"edgeship_{kind}_{i}" for i in range(len(names))] for kind, names in enumerate(current)]
    for olds, news in ((current, placeholders), (placeholders, wanted)):
        for kind in (0, 1):
            for old, new in zip(olds[kind], news[kind]):
                ct.utils.rename_feature(spec, old, new, rename_inputs=kind == 0, rename_outputs=kind == 1)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def build_decoder(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """A decoder LM as a stateful Core ML model: the KV cache is model state (iOS 18+), the prompt length
    and position are flexible (inputs ``input_ids`` [1, seq] and ``causal_mask`` [1, 1, seq, end]), the
    output is the last token's logits. Apps create one state per conversation (``makeState()``)."""
    from .. import llm

    if DEPLOYMENT_TARGETS.index(spec.deployment_target or "iOS17") < DEPLOYMENT_TARGETS.index("iOS18"):
        raise ConversionError(spec.filename, f"a language model keeps its KV cache as Core ML state, which needs "
                                             f"deployment_target = \"iOS18\" or later (the target says "
                                             f"{spec.deployment_target or 'iOS17'})")
    language = model.language
    context = language.max_context
    decoder = llm.StatefulDecoder(language.working_copy(), context).eval()
    try:
        program = llm.export_stateful(decoder, int(language.tokenizer.bos_token_id or 0))
    except Exception as exc:
        raise ConversionError(spec.filename, f"torch.export of the stateful decoder failed: {exc}") from exc
    plan = plan_layers(decoder, SCHEMES[spec.quant], spec.group_size, spec.skip_layers)
    mlmodel, layers = _compress(convert(program, spec), plan, spec)
    _save(mlmodel, spec, destination)
    states = [state.name for state in mlmodel.get_spec().description.state]
    return Built(layers=layers, details={"deployment_target": spec.deployment_target,
                                         "compute_precision": spec.compute_precision, "max_context": context - 1,
                                         "inputs": ["input_ids", "causal_mask"], "kv_cache_states": states})


def build_seq2seq(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """A T5 as one package with two functions (iOS 18 multifunction): ``encode`` (the encoder, and every
    decoder layer's cross-attention keys and values) and ``decode`` (one token; its self-attention cache is
    model state, where the token goes given by the length of ``decoder_mask``). Apps load the function they
    call (``MLModelConfiguration.functionName``) and make one state per input for decode."""
    import coremltools as ct

    from .. import seq2seq

    if DEPLOYMENT_TARGETS.index(spec.deployment_target or "iOS17") < DEPLOYMENT_TARGETS.index("iOS18"):
        raise ConversionError(spec.filename, f"a text-to-text package keeps its decoder cache as state in a "
                                             f"multifunction package, which needs deployment_target = \"iOS18\" or "
                                             f"later (the target says {spec.deployment_target or 'iOS17'})")
    task = model.seq2seq
    try:
        programs = seq2seq.export_core_ml_steps(task.working_copy(), task.source_len, task.max_target)
    except Exception as exc:
        raise ConversionError(spec.filename, f"torch.export of the encode/decode steps failed: {exc}") from exc
    outputs = {"encode": "cross_kv", "decode": "logits"}
    layers: list[LayerDecision] = []
    descriptor = ct.utils.MultiFunctionDescriptor()
    with tempfile.TemporaryDirectory() as scratch:
        for name, (program, step, sample) in programs.items():
            output = outputs[name]
            # each function is planned over the linears it calls (the steps share one T5)
            unused = linears_not_called(step, sample)
            plan = [d for d in plan_layers(step, SCHEMES[spec.quant], spec.group_size, spec.skip_layers)
                    if d.name not in unused]
            mlmodel, confirmed = _compress(convert(program, spec), plan, spec)
            mlmodel = _named_features(mlmodel, tuple(f.name for f in mlmodel.get_spec().description.input), (output,))
            layers += confirmed
            part = Path(scratch) / f"{name}.mlpackage"
            _save(mlmodel, spec, part)
            descriptor.add_function(str(part), src_function_name="main", target_function_name=name)
        descriptor.default_function_name = "decode"
        try:
            ct.utils.save_multifunction(descriptor, str(destination))
        except Exception as exc:
            raise ConversionError(spec.filename, f"saving the two functions as one package failed: {exc}") from exc
    return Built(layers=layers, details={"deployment_target": spec.deployment_target,
                                         "compute_precision": spec.compute_precision, "functions": ["encode", "decode"],
                                         "source_len": task.source_len, "max_target": task.max_target})


def _save(mlmodel: Any, spec: ArtifactSpec, destination: Path) -> None:
    try:
        mlmodel.save(str(destination))
    except Exception as exc:
        raise ConversionError(spec.filename, f"saving the Core ML package failed: {exc}") from exc


def _compress(mlmodel: Any, plan: list[LayerDecision], spec: ArtifactSpec) -> tuple[Any, list[LayerDecision]]:
    """coremltools weight compression of the planned layers (sparse storage first, when the target asks for it,
    then quantisation of what is left); each layer reported as it really came out."""
    scheme = SCHEMES[spec.quant]
    from coremltools.optimize.coreml import (OpThresholdPrunerConfig, OptimizationConfig, linear_quantize_weights,
                                             prune_weights)

    if spec.sparse_weights is not None:
        # A threshold of ~0 only drops the zeros the weight already has: storing it sparse is lossless.
        sparse = OpThresholdPrunerConfig(threshold=1e-12, minimum_sparsity_percentile=spec.sparse_weights)
        try:
            mlmodel = prune_weights(mlmodel, OptimizationConfig(global_config=sparse))
        except Exception as exc:
            raise ConversionError(spec.filename, f"coremltools sparse weight storage failed: {exc}") from exc
    if scheme.weight_bits is not None:
        config = library_config("mlpackage", spec.quant, spec.group_size)
        keep_float = {_mil_name(d.name) for d in plan if not d.quantised}
        # op_name_configs are keyed by const op names, which carry a dtype suffix after conversion.
        names = {op.name for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "const"}
        overrides = {n: None for n in names if any(n == k or n.startswith(k + "_to_") for k in keep_float)}
        try:
            mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=config, op_name_configs=overrides),
                                              joint_compression=spec.sparse_weights is not None)
        except Exception as exc:
            raise ConversionError(spec.filename, f"coremltools weight compression failed: {exc}") from exc
    if scheme.weight_bits is None and spec.sparse_weights is None:
        return mlmodel, plan
    return mlmodel, _reconcile(plan, compressed_weights(mlmodel))


def _reconcile(plan: list[LayerDecision], compressed: dict[str, tuple[str, ...]]) -> list[LayerDecision]:
    """Report each layer as quantised only if its weight really is, with the constexpr ops that hold it, and
    as stored sparse only if a sparse_to_dense op rebuilds it."""
    quantised, sparse = {}, set()
    for decision in plan:
        chain = next((c for name, c in compressed.items() if name.startswith(_mil_name(decision.name))), ())
        if _SPARSE_OP in chain:
            sparse.add(decision.name)
        if any(op != _SPARSE_OP for op in chain):
            quantised[decision.name] = " + ".join(chain)
    confirmed = confirm(plan, quantised, "coremltools left this weight uncompressed")
    return [replace(d, stored_sparse=d.name in sparse) for d in confirmed]


def load(path: Path, backend: str = "mlprogram") -> Runner | None:
    if platform.system() != "Darwin":
        return None  # Core ML prediction exists only on macOS
    import coremltools as ct
    import numpy as np

    mlmodel = ct.models.MLModel(str(path))
    spec = mlmodel.get_spec()
    input_names = [i.name for i in spec.description.input]
    output_names = [o.name for o in spec.description.output]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = mlmodel.predict(dict(zip(input_names, inputs)))
        return [np.asarray(result[name]) for name in output_names]

    return run


def lm_stepper(path: Path, backend: str = "mlprogram") -> Any:
    """Feed tokens at a position, get the last token's logits: the stateful model on macOS (the device
    runner's own stepper, one Core ML state per conversation), else None."""
    if platform.system() != "Darwin":
        return None  # Core ML prediction exists only on macOS; parity stays pending a Mac
    from device_tests.runner import coreml_lm_stepper

    return coreml_lm_stepper(str(path))


class _CoreMLSeq2Seq:
    """A package's encode and decode functions behind seq2seq_parity's stepper interface (macOS only): one
    Core ML state per input, the decoder's position given by the length of its mask."""

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self.encoder = ct.models.MLModel(str(path), function_name="encode")
        self.decoder = ct.models.MLModel(str(path), function_name="decode")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, Any]:
        ids, mask = input_ids.astype(np.int32), attention_mask.astype(np.int32)
        cross = self.encoder.predict({"input_ids": ids, "attention_mask": mask})["cross_kv"]
        return {"cross_kv": cross, "attention_mask": mask, "state": self.decoder.make_state()}

    def decode(self, state: dict[str, Any], token: int, position: int, attention_mask: np.ndarray) -> np.ndarray:
        inputs = {"token": np.array([[token]], np.int32), "decoder_mask": np.zeros((1, 1, 1, position + 1), np.float32),
                  "cross_kv": state["cross_kv"], "attention_mask": state["attention_mask"]}
        return np.asarray(self.decoder.predict(inputs, state=state["state"])["logits"], np.float32).reshape(-1)


def seq2seq_stepper(path: Path, backend: str = "mlprogram") -> Any:
    """Encode once, decode token by token with the package's two functions, or None off macOS (parity stays
    pending a Mac; the package's structure is checked instead)."""
    if platform.system() != "Darwin":
        return None
    return _CoreMLSeq2Seq(path)


_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}


def inspect(path: Path) -> Signature:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))

    def specs(features: Any) -> tuple[TensorSpec, ...]:
        out = []
        for feature in features:
            array = feature.type.multiArrayType
            out.append(TensorSpec(feature.name, _ARRAY_DTYPES.get(array.dataType, str(array.dataType)), tuple(array.shape)))
        return tuple(out)

    if spec.description.functions:  # a multifunction package: each function's, prefixed with its name
        return Signature(tuple(replace(t, name=f"{f.name}.{t.name}") for f in spec.description.functions
                               for t in specs(f.input)),
                         tuple(replace(t, name=f"{f.name}.{t.name}") for f in spec.description.functions
                               for t in specs(f.output)))
    return Signature(specs(spec.description.input), specs(spec.description.output))


def check(path: Path, input_shapes: list[tuple[int, ...]], output_count: int,
          built_layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What can be verified without a Mac: the package loads, its signature matches, weights compressed as planned."""
    import coremltools as ct

    signature = inspect(path)
    checks = [{"check": "package loads (spec and weights readable)", "passed": True}]
    description = ct.utils.load_spec(str(path)).description
    states = [state.name for state in description.state]
    got_inputs = [t.shape for t in signature.inputs]
    if description.functions:  # a text-to-text pair: encode, and decode with its cache as state
        functions = {f.name: f for f in description.functions}
        checks.append({"check": "package holds the encode and decode functions",
                       "passed": sorted(functions) == ["decode", "encode"], "found": sorted(functions)})
        decode_states = [s.name for s in functions["decode"].state] if "decode" in functions else []
        keys = sorted(s.removeprefix("k_cache_") for s in decode_states if s.startswith("k_cache_"))
        values = sorted(s.removeprefix("v_cache_") for s in decode_states if s.startswith("v_cache_"))
        checks.append({"check": "decode keeps a key and a value cache per decoder layer as state",
                       "passed": bool(keys) and keys == values and len(keys) + len(values) == len(decode_states),
                       "found": decode_states})
        checks.append({"check": "outputs are encode's cross_kv and decode's logits",
                       "passed": sorted(t.name for t in signature.outputs) == ["decode.logits", "encode.cross_kv"],
                       "found": [t.name for t in signature.outputs]})
    elif states:  # a stateful decoder: its own inputs, and one key and one value cache per attention layer
        names = [t.name for t in signature.inputs]
        checks.append({"check": "decoder inputs are input_ids and causal_mask",
                       "passed": names == ["input_ids", "causal_mask"], "found": names})
        keys = sorted(s.removesuffix("k_cache") for s in states if s.endswith("k_cache"))
        values = sorted(s.removesuffix("v_cache") for s in states if s.endswith("v_cache"))
        checks.append({"check": "KV cache is model state (a key and a value cache per attention layer)",
                       "passed": bool(keys) and keys == values and len(keys) + len(values) == len(states),
                       "found": states})
    else:
        want_inputs = [tuple(s) for s in input_shapes]
        checks.append({"check": "input shapes match the model", "passed": want_inputs == got_inputs,
                       "expected": [list(s) for s in want_inputs], "found": [list(s) for s in got_inputs]})
    if not description.functions:
        checks.append({"check": "output count matches the model", "passed": len(signature.outputs) == output_count,
                       "expected": output_count, "found": len(signature.outputs)})
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    checks.append({"check": "weights file present", "passed": weights.is_file()})
    saved = saved_compressed_weights(path)

    def layers_with(op_types: Any) -> list[str]:
        return sorted(d["layer"] for d in built_layers
                      if any(n.startswith(_mil_name(d["module_path"])) and op_types(t) for n, t in saved.items()))

    planned = sorted(d["layer"] for d in built_layers if d["quantised"])
    found = layers_with(lambda op: op != _SPARSE_OP)
    checks.append({"check": "saved package compresses exactly the planned weights", "passed": planned == found,
                   "expected": planned, "found": found})
    planned_sparse = sorted(d["layer"] for d in built_layers if d.get("stored_sparse"))
    found_sparse = layers_with(lambda op: op == _SPARSE_OP)
    if planned_sparse or found_sparse:
        checks.append({"check": "saved package stores exactly the reported weights sparse",
                       "passed": planned_sparse == found_sparse, "expected": planned_sparse, "found": found_sparse})
    return checks


def saved_compressed_weights(path: Path) -> dict[str, str]:
    """Output names of constexpr (compressed-weight) ops in the saved package's program -> op type."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    found = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            found.update({op.outputs[0].name: op.type for op in block.operations if op.type.startswith("constexpr_")})
    return found
