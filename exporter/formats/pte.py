"""ExecuTorch programs (.pte): torchao quantisation, XNNPACK / Core ML / portable lowering, in-process runtime."""

from __future__ import annotations

import contextlib
import copy
import platform
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import seq2seq
from ..errors import ConversionError
from ..quant import SCHEMES, LayerDecision, confirm, library_config, linears_not_called, plan_layers
from ..sources import LoadedModel
from ..targets import ArtifactSpec
from ..heap import float_copy_released, return_freed_memory
from ..weights_on_disk import own_memory
from . import Built, Runner, Signature, TensorSpec, carried_linears, tied_table, xnnpack_passes, xnnpack_shapes
from .xnnpack_linears import retrace_friendly

# "aten.erfinv.default", "aten::erfinv", "mylib::op": how ExecuTorch names ops in its errors.
_OP_PATTERN = re.compile(r"\baten(?:::|\.)\w+(?:\.\w+)?|\b[a-z_][a-z0-9_]*::\w+")


def quantise(source: torch.nn.Module, spec: ArtifactSpec, *, in_place: bool = False,
             sample_inputs: tuple[Any, ...] | None = None,
             only: frozenset[str] | None = None) -> tuple[torch.nn.Module, list[LayerDecision]]:
    """Apply the target's scheme with torchao to a copy of the module, following the layer plan (of the
    linears named in ``only``, if given). With ``sample_inputs``, a linear the forward never calls keeps
    its float weight: torchao's quantised weight serves only the linear's own call, and the graph reading
    the weight directly would not export."""
    scheme = SCHEMES[spec.quant]
    plan = plan_layers(source, scheme, spec.group_size, spec.skip_layers, only)
    if scheme.weight_bits is None:
        return source, plan
    if sample_inputs is not None:
        read_directly = linears_not_called(source, sample_inputs)
        plan = [replace(d, quantised=False, reason="its weight is read directly, not called as a layer")
                if d.quantised and d.name in read_directly else d for d in plan]
    from torchao.quantization import quantize_

    module = source if in_place else copy.deepcopy(source)
    chosen = {d.name for d in plan if d.quantised}
    config = library_config("pte", spec.quant, spec.group_size)
    large = {name for name in chosen if module.get_submodule(name).weight.numel() > ROW_BLOCK_ELEMENTS}
    whole = chosen - large
    quantize_(module, config, filter_fn=lambda layer, fqn: fqn in whole)
    for name in large:
        _quantise_in_row_blocks(module.get_submodule(name), config)
    # torchao swaps a quantised weight for a tensor subclass; a plain tensor means it passed the layer over.
    found = {d.name: "" for d in plan if d.quantised
             and type(module.get_submodule(d.name).weight) not in (torch.Tensor, torch.nn.Parameter)}
    return module, confirm(plan, found, "torchao left this layer float")


# torchao holds about three float temporaries the size of a weight while it quantises it: for the lm_head of
# Llama-3.2-1B (128,256 x 2,048, 1.05 GB in fp32) a 3 GB moment, the export's memory peak. A weight larger
# than this many elements is quantised in blocks of rows.
ROW_BLOCK_ELEMENTS = 1 << 24


def _quantise_in_row_blocks(layer: torch.nn.Linear, config: Any) -> None:
    """torchao's quantisation of ``layer`` one block of rows at a time, the blocks joined into one weight.
    Rows are quantised independently (a scale per row, or per group along it), so the joined weight is
    the one torchao makes of the whole; a weight type that cannot be joined that way is quantised whole."""
    from torchao.quantization import quantize_

    weight = layer.weight.detach()
    rows, cols = weight.shape
    step = max(1, ROW_BLOCK_ELEMENTS // cols)
    pieces = []
    for start in range(0, rows, step):
        piece = torch.nn.Linear(cols, min(step, rows - start), bias=False)
        piece.weight = torch.nn.Parameter(weight[start:start + step], requires_grad=False)
        quantize_(piece, config)
        quantised = piece.weight
        if not _joins_by_rows(quantised):
            quantize_(layer, config)
            return
        pieces.append(quantised)
    first = pieces[0]
    data = [torch.cat([getattr(p, name) for p in pieces]) for name in first.tensor_data_names]
    joined = type(first)(*data, *(getattr(first, name) for name in first.tensor_attribute_names))
    layer.weight = torch.nn.Parameter(joined, requires_grad=False)


def _joins_by_rows(weight: torch.Tensor) -> bool:
    """A torchao weight whose data tensors all run along the rows, one entry or more per row."""
    names = getattr(weight, "tensor_data_names", None)
    block = getattr(weight, "block_size", None)
    optional = [*getattr(weight, "optional_tensor_data_names", []), *getattr(weight, "optional_tensor_attribute_names", [])]
    return (bool(names) and not optional and block is not None and block[0] == 1
            and all(getattr(weight, name).shape[0] == weight.shape[0] for name in names))


def partitioners(spec: ArtifactSpec) -> list[Any]:
    if spec.backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if spec.backend == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        compile_specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=getattr(ct.target, spec.deployment_target or "iOS17"),
            compute_precision=ct.precision.FLOAT16 if spec.compute_precision == "fp16" else ct.precision.FLOAT32,
        )
        return [CoreMLPartitioner(compile_specs=compile_specs)]
    return []


def lower(
    program: torch.export.ExportedProgram,
    spec: ArtifactSpec,
    destination: Path,
    *,
    check_ir_validity: bool = True,
    shared_table: torch.Tensor | None = None,
    **to_edge: Any,
) -> tuple[dict[str, Any], list[str]]:
    """to_edge + delegate + to_executorch, the program written to ``destination``; a failure names the
    ops it could not handle. Returns the delegation details and the data files written beside it:
    with ``shared_table`` (tied_table.py), ``<stem>.ptd`` holding that table once.

    IR validity checks stay on unless a caller brings its own custom ops (the LLM path): without
    them an op with no kernel lowers fine and only fails when the runtime loads the program.
    """
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    try:
        passes = [tied_table.delegate_tagging(program, shared_table)] if shared_table is not None else []
        with xnnpack_passes.only_passes_with_work() if spec.backend == "xnnpack" else contextlib.nullcontext():
            edge = to_edge_transform_and_lower(
                program, partitioner=partitioners(spec), transform_passes=passes,
                compile_config=EdgeCompileConfig(_check_ir_validity=check_ir_validity), **to_edge,
            )
        release_lowering_leftovers()  # before to_executorch, which has its own peak
        details = delegation(edge)
        if shared_table is not None and not tied_table.tag_program_copies(edge, shared_table):
            raise ValueError("the embedding's use of the tied table is not among the lowered program's constants")
        executorch_program = edge.to_executorch()
        with open(destination, "wb") as out:  # streamed: no second copy of the program in memory
            executorch_program.write_to_file(out)
        if shared_table is not None:  # writes <tag>.ptd for each tag beside the program
            executorch_program.write_tensor_data_to_file(str(destination.parent))
    except Exception as exc:
        raise ConversionError(spec.filename, f"ExecuTorch could not lower the model: {describe_failure(exc)}") from exc
    finally:
        release_lowering_leftovers()
    if shared_table is None:
        return details, []
    written = destination.parent / f"{tied_table.TAG}.ptd"
    if not written.is_file():
        raise ConversionError(spec.filename, f"ExecuTorch wrote no {written.name} for the tied table")
    data_file = written.replace(destination.with_suffix(".ptd"))
    return details, [data_file.name]


def release_lowering_leftovers() -> None:
    """Let go of the graphs a lowering leaves reachable from module globals. ExecuTorch's partitioning
    memoises ``is_same_node`` in an unbounded lru_cache keyed by fx nodes, its XNNPACK configs keep the
    last node they rejected in module-level WhyNoPartition loggers, FakeTensorMode's class-wide dispatch
    cache keys hold the lowered delegate modules (with their original programs), and torch.export keeps a
    map of the last trace's proxies. Each node holds its whole graph with its fake tensors: after the
    default model's .pte, 19,000 nodes kept for the rest of the process (docs/language-models.md "How an export uses memory")."""
    from executorch.exir.backend import utils
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental import proxy_tensor

    utils.is_same_node.cache_clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("executorch.") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, utils.WhyNoPartition):
                    value.node = None
    FakeTensorMode.cache_clear()  # only a speed-up for the next trace
    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()  # private: may go away


def data_file_of(path: Path) -> Path | None:
    """The .ptd beside a .pte (same stem), which holds constants the program keeps outside itself."""
    candidate = Path(path).with_suffix(".ptd")
    return candidate if candidate.is_file() else None


def describe_failure(exc: BaseException) -> str:
    text = str(exc)
    ops = sorted(set(_OP_PATTERN.findall(text)))
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return f"unsupported op(s) {', '.join(ops[:5])}: {first_line}" if ops else f"{type(exc).__name__}: {first_line}"


def delegation(edge: Any) -> dict[str, Any]:
    """How much of the graph the backend took; ops left to portable kernels run much slower."""
    delegated, remaining = 0, {}
    nodes = [node for method in sorted(edge.methods) for node in edge.exported_program(method).graph.nodes]
    for node in nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            delegated += 1
        elif not name.startswith("getitem"):
            remaining[name] = remaining.get(name, 0) + 1
    return {"delegate_calls": delegated, "non_delegated_ops": dict(sorted(remaining.items()))}


def build(model: LoadedModel, program: torch.export.ExportedProgram | None, spec: ArtifactSpec, destination: Path) -> Built:
    if model.language is not None:
        return build_decoder(model, spec, destination)
    if model.seq2seq is not None:
        return build_seq2seq(model, spec, destination)
    assert program is not None  # the pipeline traces once for every non-language model
    # No GGUF blocks to carry outside a language model: every linear is one the recipe re-quantises.
    module, layers = quantise(model.module, _with_scheme(spec, spec.requantise, []) if spec.requantise else spec,
                              sample_inputs=model.sample_inputs)
    if module is not model.module:
        if spec.backend == "xnnpack":
            retrace_friendly(module)
        try:
            program = torch.export.export(module, model.sample_inputs, strict=False)
        except Exception as exc:
            raise ConversionError(spec.filename, f"torch.export of the quantised model failed: {describe_failure(exc)}") from exc
    details, _ = lower(program, spec, destination)
    return Built(layers=layers, details=details)


def load_runtime_extensions() -> None:
    """Kernels that LLM programs use (custom SDPA, KV-cache update, quantised embeddings)."""
    for module in ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"):
        try:
            __import__(module)
        except ImportError:  # an older wheel without them can still run plain programs
            pass


def _forward_method(path: Path, backend: str) -> Any | None:
    """The program's forward method on this host's runtime, or None where it cannot run (Core ML off macOS)."""
    if backend == "coreml" and platform.system() != "Darwin":
        return None  # the Core ML delegate executes only on Apple hardware
    from executorch.runtime import Runtime

    load_runtime_extensions()
    try:
        return Runtime.get().load_program(str(path), data_path=data_file_of(path)).load_method("forward")
    except RuntimeError as exc:
        raise ConversionError(path.name, f"the ExecuTorch runtime cannot load the program ({exc}); "
                                         "an operator in it has no kernel in this runtime") from exc


def load(path: Path, backend: str = "xnnpack") -> Runner | None:
    method = _forward_method(path, backend)
    if method is None:
        return None
    meta = method.metadata
    dtypes = [_dtype(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        tensors = [t.to(d) if d is not None else t for t, d in zip(tensors, dtypes)]
        return [o.detach().numpy().copy() for o in method.execute(tensors)]

    return run


# c10::ScalarType codes, as MethodMeta reports them.
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}


def _dtype(info: Any) -> torch.dtype | None:
    return _SCALAR_TYPES.get(int(info.dtype()))


def inspect(path: Path) -> Signature:
    """The forward method's inputs and outputs; a program of named methods instead (a text-to-text model's
    encode and decode) lists each method's, prefixed with the method's name, in the program's order."""
    from executorch.runtime import Runtime

    load_runtime_extensions()
    program = Runtime.get().load_program(str(path), data_path=data_file_of(path))
    methods = ["forward"] if "forward" in program.method_names else [m for m in seq2seq.METHODS if m in program.method_names]

    def specs(count: int, getter: Any, prefix: str) -> tuple[TensorSpec, ...]:
        out = []
        for i in range(count):
            info = getter(i)
            dtype = _dtype(info)
            out.append(TensorSpec(f"{prefix}_{i}", str(dtype).removeprefix("torch.") if dtype else "?", tuple(info.sizes())))
        return tuple(out)

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    for method in methods:
        meta = program.metadata(method)
        prefix = "" if method == "forward" else f"{method}."
        inputs += specs(meta.num_inputs(), meta.input_tensor_meta, f"{prefix}input")
        outputs += specs(meta.num_outputs(), meta.output_tensor_meta, f"{prefix}output")
    return Signature(inputs, outputs)


def check(path: Path, input_shapes: list[tuple[int, ...]], output_count: int,
          built_layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For programs that cannot execute here (Core ML delegate): the program loads and its signature matches."""
    signature = inspect(path)
    found_inputs = [t.shape for t in signature.inputs]
    want_inputs = [tuple(s) for s in input_shapes]
    return [
        {"check": "program loads (flatbuffer and method metadata readable)", "passed": True},
        {"check": "input shapes match the model", "passed": found_inputs == want_inputs,
         "expected": [list(s) for s in want_inputs], "found": [list(s) for s in found_inputs]},
        {"check": "output count matches the model", "passed": len(signature.outputs) == output_count,
         "expected": output_count, "found": len(signature.outputs)},
    ]


def _carried_blocks(model: LoadedModel, causal_lm: torch.nn.Module, spec: ArtifactSpec) -> dict[str, Any]:
    """Q4_1 blocks by linear name, when the artifact wants int4 blocks of that size (else {}): read from
    a GGUF source, or recovered from a HF folder's weights that are a dequantised Q4_1 GGUF."""
    from ..sources.gguf_blocks import GROUP, blocks_in_model, read_blocks

    scheme = SCHEMES[spec.quant]
    if (spec.backend != "xnnpack" or scheme.weight_bits != 4 or not scheme.dynamic_activations
            or spec.group_size != GROUP or model.source.get("kind") not in ("gguf", "hf-folder")):
        return {}
    if model.source["kind"] == "gguf":
        blocks = read_blocks(Path(model.source["path"]), causal_lm)
    else:
        head = causal_lm.get_output_embeddings()
        blocks = {name: b for name, b in blocks_in_model(causal_lm).items() if causal_lm.get_submodule(name) is not head}
    return {name: b for name, b in blocks.items()
            if not any(re.fullmatch(pattern, f"inner.{name}") for pattern in spec.skip_layers)}


def _with_scheme(spec: ArtifactSpec, quant: str, skip: list[str]) -> ArtifactSpec:
    grouped = SCHEMES[quant].grouped
    return replace(spec, quant=quant, group_size=spec.group_size if grouped else None,
                   skip_layers=spec.skip_layers + tuple(skip))


def _quantise_linears(decoder: torch.nn.Module, spec: ArtifactSpec, carried: dict[str, Any],
                      only: frozenset[str]) -> dict[str, LayerDecision]:
    """The linears named in ``only``: the lm_head with lm_head_quant, every other linear with requantise
    (or quant) but those with carried GGUF blocks, which carried_linears.carry quantises after."""
    head = next(n for n, m in decoder.named_modules() if m is decoder.inner.get_output_embeddings())
    set_apart = [re.escape(f"inner.{n}") for n in carried] + ([re.escape(head)] if spec.lm_head_quant else [])
    _, decisions = quantise(decoder, _with_scheme(spec, spec.requantise or spec.quant, set_apart), in_place=True,
                            only=only)
    by_name = {d.name: d for d in decisions}
    if spec.lm_head_quant and head in only:
        _, head_plan = quantise(decoder, _with_scheme(spec, spec.lm_head_quant, [f"(?!{re.escape(head)}$).*"]),
                                in_place=True, only=frozenset({head}))
        by_name[head] = head_plan[0]
    return by_name


def _by_layer(decoder: torch.nn.Module) -> list[tuple[torch.nn.Module, frozenset[str]]]:
    """The decoder's stack of layers one by one, then the model around them (embedding, final norm,
    lm_head): each with the names of its linears. A model without one stack is one part."""
    causal_lm = decoder.inner
    stack = next((m for m in causal_lm.base_model.children() if isinstance(m, torch.nn.ModuleList)), [])
    linears = {m: n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    parts = [(layer, frozenset(linears.pop(m) for m in layer.modules() if m in linears)) for layer in stack]
    return [*parts, (causal_lm, frozenset(linears.values()))]


def _pairs_in(part: torch.nn.Module, pairs: list[Any]) -> tuple[list[Any], list[Any]]:
    """Smoothing's (producer, consumers) pairs inside ``part``, and the others. A helper so that the set of
    the part's modules goes with it: held on, it would keep the fp32 embedding the tied table replaces
    (1 GiB at 1.2B) through the lowering."""
    inside = set(part.modules())
    return [pair for pair in pairs if pair[0] in inside], [pair for pair in pairs if pair[0] not in inside]


def calibration_run(decoder: Any, language: Any) -> Any:
    """One pass of the calibration text through the decoder's model (in chunks that fit its context), with
    transformers' own attention for the pass: the KV-cache ops and their buffers are left untouched. What
    carried_linears measures its mean factors on."""
    from ..smoothing import calibration_text

    ids = language.tokenizer(calibration_text())["input_ids"]
    chunk = min(256, decoder.max_context)
    config = decoder.inner.config

    def run() -> None:
        chosen, config._attn_implementation = config._attn_implementation, "sdpa"
        try:
            for start in range(0, len(ids), chunk):
                decoder.inner(input_ids=torch.tensor([ids[start:start + chunk]]), use_cache=False)
        finally:
            config._attn_implementation = chosen

    return run


def build_decoder(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """A language model as ExecuTorch's LLM runners want it: KV cache in the program, custom SDPA and
    cache-update ops, int8 embedding lookups, dynamic prompt length, runner metadata, and a GGUF's
    4-bit blocks carried over exactly where the scheme matches them."""
    if spec.backend == "coreml":
        return _build_coreml_decoder(model, spec, destination)
    return _build_xnnpack_decoder(model, model.language.working_copy(fp32=False), spec, destination)


def _build_xnnpack_decoder(model: LoadedModel, causal_lm: torch.nn.Module, spec: ArtifactSpec,
                           destination: Path) -> Built:
    """``causal_lm``: a working copy with its weights as held (fp32, or the checkpoint's bf16/fp16 mapped
    from the parked file). Each layer is made fp32, smoothed and quantised before the next is touched, so
    the fp32 model never exists whole (4.9 GB for a 1.2B model); the result is the same as for the whole
    model at once, since smoothing and quantisation change each layer's weights alone."""
    from .. import llm
    from ..smoothing import pairs, smooth
    from ..sources.precision import upcast

    language = model.language
    carried = _carried_blocks(model, causal_lm, spec)
    layers: list[LayerDecision] = []
    details_extra: dict[str, Any] = {"carried_gguf_blocks": len(carried)}
    share_table = spec.embedding_quant == "tied" and tied_table.is_tied(causal_lm)  # targets: xnnpack only
    if spec.smoothing and causal_lm.get_output_embeddings().weight is causal_lm.get_input_embeddings().weight:
        head = causal_lm.get_output_embeddings()  # untie so the lm_head can be smoothed on its own
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    to_smooth = pairs(causal_lm) if spec.smoothing else []
    by_module = {causal_lm.get_submodule(name): blocks for name, blocks in carried.items()}
    decoder = llm.ExportableDecoder(causal_lm, language.max_context).eval()
    order = [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]  # before carry adds its own
    decisions: dict[str, LayerDecision] = {}
    rescaled, unsmooth = 0, None
    for part, linears in _by_layer(decoder):
        upcast(part)
        mine, to_smooth = _pairs_in(part, to_smooth)
        if spec.smoothing:  # before any int8 lookup exists; the calibration ran on the float reference
            rescaled += smooth(causal_lm, language.tokenizer, spec.smoothing, by_module, language.calibration_maxima(),
                               only=mine)
        if part is causal_lm:  # the last part: embedding, final norm and lm_head
            # A shared table is tied after the lm_head is quantised (it reads the head's int8 rows); 1/s undoes
            # the smoothing the head's columns took, measured now while both are float.
            unsmooth = (tied_table.unsmoothing(causal_lm.get_input_embeddings().weight,
                                               causal_lm.get_output_embeddings().weight) if share_table else None)
            causal_lm.config.tie_word_embeddings = False  # the lm_head keeps its own weight, quantised with the linears
            if spec.embedding_quant and not share_table:
                _quantise_embedding(causal_lm, layers, "" if spec.embedding_quant == "int8" else
                                    "; not tied to the lm_head in this model, so it keeps its own table")
        decisions.update(_quantise_linears(decoder, spec, carried, linears))
    if spec.smoothing:
        details_extra["smoothing"] = {"alpha": spec.smoothing, "rescaled_linears": rescaled}
    if carried:
        found = carried_linears.carry(decoder, {f"inner.{name}": b for name, b in carried.items()},
                                      calibration_run(decoder, language))
        for name, why in found.items():
            decisions[name] = replace(decisions[name], quantised=True, reason=why)
    layers += [decisions[name] for name in order]
    if spec.backend == "xnnpack":
        retrace_friendly(decoder)
    table = None
    if share_table:
        shape = tuple(causal_lm.get_input_embeddings().weight.shape)
        name = tied_table.tie(causal_lm, causal_lm.get_output_embeddings(), unsmooth)
        if name is None:
            _quantise_embedding(causal_lm, layers, "; the lm_head is not int8 per channel, so it keeps its own table")
        else:
            table = causal_lm.get_output_embeddings().weight_int
            layers.insert(0, LayerDecision(f"inner.{name}", "embedding", shape, True,
                                           "the lm_head's int8 rows (embedding_byte), stored once in the .ptd"
                                           + (", unsmoothed by one multiply" if unsmooth is not None else "")))
    own_memory(decoder)  # quantised: the fp32 source's mapping can go before the lowering's peak
    return_freed_memory()
    float_copy_released()
    sample = (torch.tensor([[1, 2, 3, 4]]), torch.tensor([0]))
    seq = torch.export.Dim("seq_len", min=1, max=language.max_context - 1)
    try:
        with xnnpack_shapes.for_decoder(decoder, causal_lm.config) if spec.backend == "xnnpack" else contextlib.nullcontext():
            program = torch.export.export(decoder, sample, dynamic_shapes=({1: seq}, None), strict=False)
    except Exception as exc:
        raise ConversionError(spec.filename, f"torch.export of the KV-cache decoder failed: {describe_failure(exc)}") from exc
    metadata = llm.runner_metadata(causal_lm.config, language.tokenizer, language.max_context, language.eos_ids)
    details, data_files = lower(program, spec, destination, check_ir_validity=False, shared_table=table,
                                constant_methods=metadata)
    details["runner_metadata"] = metadata
    return Built(layers=layers, details={**details, **details_extra}, companions=data_files)


def _quantise_embedding(causal_lm: torch.nn.Module, layers: list[LayerDecision], why: str) -> None:
    """Its own int8 table in blocks of llm.EMBEDDING_GROUP (like GGUF Q8_0), first in the layer report."""
    from .. import llm

    shape = tuple(causal_lm.get_input_embeddings().weight.shape)
    group = llm.EMBEDDING_GROUP if shape[1] % llm.EMBEDDING_GROUP == 0 else None
    name = llm.quantise_embedding(causal_lm, group)
    layers.insert(0, LayerDecision(f"inner.{name}", "embedding", shape, True,
                                   f"int8 {'groups of ' + str(group) if group else 'per row'} (embedding_byte){why}"))


def _build_coreml_decoder(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """Core ML cannot run ExecuTorch's custom attention ops, so the delegate gets the stateful decoder of
    the .mlpackage (inputs input_ids and causal_mask; the KV cache becomes Core ML state inside the
    delegate): one delegate call for the whole model, for apps that already embed ExecuTorch."""
    from .. import llm

    language = model.language
    decoder = llm.StatefulDecoder(language.working_copy(), language.max_context).eval()
    module, layers = quantise(decoder, spec, in_place=True)
    own_memory(module)
    try:
        program = llm.export_stateful(module, int(language.tokenizer.bos_token_id or 0))
    except Exception as exc:
        raise ConversionError(spec.filename, f"torch.export of the stateful decoder failed: {describe_failure(exc)}") from exc
    details, _ = lower(program, spec, destination, check_ir_validity=False)
    return Built(layers=layers, details={**details, "inputs": ["input_ids", "causal_mask"],
                                         "sample_input_shapes": llm.stateful_input_bounds(language.max_context)})


def build_seq2seq(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """A T5 as one program with two methods: ``encode`` (the encoder, and every decoder layer's
    cross-attention keys and values) and ``decode`` (one token, its self-attention cache in the program).
    For the Core ML delegate, decode is the .mlpackage's stateful step (the cache becomes Core ML state
    inside the delegate, the position the length of ``decoder_mask``): one delegate call per method."""
    task = model.seq2seq
    t5 = task.working_copy()
    # Both methods read the same linears; each is quantised once, as a layer of the shared model. No GGUF
    # blocks are carried here, so every linear takes the recipe's re-quantisation scheme, the lm_head its own.
    head = ["lm_head"] if spec.lm_head_quant else []
    _, layers = quantise(t5, _with_scheme(spec, spec.requantise or spec.quant, head), in_place=True)
    if spec.lm_head_quant:
        _, head_plan = quantise(t5, _with_scheme(spec, spec.lm_head_quant, ["(?!lm_head$).*"]), in_place=True)
        layers = [next(h for h in head_plan if h.name == d.name) if d.name == "lm_head" else d for d in layers]
    if spec.embedding_quant:  # each method holds its own copy of the table: int8 makes both four times smaller
        _quantise_embedding(t5, layers, "" if spec.embedding_quant == "int8" else
                            "; its own table: sharing the lm_head's rows is built for decoder-only programs")
    if spec.backend == "xnnpack":
        retrace_friendly(t5)
    try:
        if spec.backend == "coreml":
            programs = {name: seq2seq.without_unused_weights(program) for name, (program, _, _)
                        in seq2seq.export_core_ml_steps(t5, task.source_len, task.max_target).items()}
        else:
            programs = seq2seq.export_methods(*seq2seq.step_modules(t5, task.max_target), task.source_len)
    except Exception as exc:
        raise ConversionError(spec.filename, f"torch.export of the encode/decode steps failed: {describe_failure(exc)}") from exc
    details, _ = lower(programs, spec, destination, check_ir_validity=False)
    details.update(methods=list(seq2seq.METHODS), source_len=task.source_len, max_target=task.max_target,
                   decode_inputs=[n.removeprefix("decode.") for n in seq2seq.signature_names(spec.backend == "coreml")[0]
                                  if n.startswith("decode.")])
    if spec.backend == "coreml":  # checked structurally: the largest inputs, as the method metadata reports them
        source, config = (1, task.source_len), t5.config
        details["sample_input_shapes"] = [source, source, (1, 1), (1, 1, 1, task.max_target),
                                          (2 * config.num_decoder_layers, config.num_heads, task.source_len,
                                           config.d_kv), source]
        details["sample_output_count"] = len(seq2seq.signature_names(stateful=True)[1])
    if spec.smoothing:
        details["options_not_applied"] = {"smoothing": "SmoothQuant is calibrated for decoder-only models"}
    return Built(layers=layers, details=details)


def seq2seq_stepper(path: Path, backend: str = "xnnpack") -> Any:
    """Encode once, decode token by token: how seq2seq_parity drives the program (the device runner's own
    stepper, so host and device step it the same way)."""
    if backend == "coreml" and platform.system() != "Darwin":
        return None
    from device_tests.runner import PteSeq2Seq

    try:
        return PteSeq2Seq(path)
    except RuntimeError as exc:
        raise ConversionError(path.name, f"the ExecuTorch runtime cannot load the program ({exc})") from exc


def lm_stepper(path: Path, backend: str = "xnnpack") -> Any:
    """Feed tokens at a position, get the last token's logits: how lm_parity drives a .pte (the device
    runner's own stepper, so host and device step a program the same way)."""
    method = _forward_method(path, backend)
    if method is None:
        return None
    from device_tests.runner import method_lm_stepper

    return method_lm_stepper(method)


def text_llm_runner_generate(path: Path, tokenizer_json: Path, prompt: str,
                             max_new_tokens: int) -> tuple[str, dict[str, Any], float]:
    """Greedy generation in ExecuTorch's own TextLLMRunner (the C++ loop of its apps and llama_main): the
    text, the runner's PyTorchObserver report, and the seconds building the runner took. Raises
    UnicodeDecodeError when a piece is a partial UTF-8 character its Python binding cannot hand over."""
    import json
    import time

    load_runtime_extensions()
    from executorch.extension.llm.runner._llm_runner import GenerationConfig, TextLLMRunner

    began = time.perf_counter()
    data = data_file_of(path)
    runner = TextLLMRunner(str(path), str(tokenizer_json), str(data) if data else None)
    built_s = time.perf_counter() - began
    config = GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.temperature = 0.0
    config.echo = False
    pieces: list[str] = []
    stats: list[str] = []
    runner.generate(prompt, config, pieces.append, lambda s: stats.append(s.to_json_string()))
    return "".join(pieces), json.loads(stats[-1]) if stats else {}, built_s


def run_text_llm_runner(path: Path, tokenizer_json: Path, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Generate with ExecuTorch's own TextLLMRunner: proof the .pte runs unchanged in its apps."""
    try:
        text, report, _ = text_llm_runner_generate(path, tokenizer_json, prompt, max_new_tokens)
    except UnicodeDecodeError:
        # A byte-level token that is not valid UTF-8 on its own: the runner ran, its Python binding
        # cannot hand the piece over. Apps receive raw bytes and are unaffected.
        return {"text": None, "note": "generated a partial UTF-8 piece the Python binding cannot decode"}
    return {"text": text, "prefill_tokens_per_s": report.get("prefill_token_per_sec"),
            "decode_tokens_per_s": report.get("decode_token_per_sec"), "prompt_tokens": report.get("prompt_tokens"),
            "generated_tokens": report.get("generated_tokens")}
