"""TFLite / LiteRT flatbuffers (.tflite): litert-torch conversion, ai-edge-quantizer per-layer recipes.

The float flatbuffer is converted once per model and every .tflite artifact of a run is
quantised from it. Fully-connected ops are matched to torch layers by their weight values, because
LiteRT's tensor names keep only class names and the last attribute (``Blk_0/Linear_fc``), and the
converter folds neighbouring scales (LayerNorm gamma, attention scaling) into the weights.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError
from ..quant import SCHEMES, LayerDecision, confirm, library_config, plan_layers
from ..sources import LoadedModel
from ..targets import ArtifactSpec
from . import Built, Runner, Signature, TensorSpec, tflite_ops

_float_cache: dict[str, bytes] = {}  # model fingerprint -> float flatbuffer, shared by this run's artifacts


_SIGNATURE_POINTS = 2048


_SIGNATURE_CORNER = 512


def weight_signature(weight: np.ndarray) -> np.ndarray:
    """A fingerprint of a weight matrix that survives per-row and per-column rescaling (and sign flips).

    Alternately normalising |W|'s columns and rows converges to the same matrix for W and D1 W D2,
    so a layer whose LayerNorm gamma was folded in still matches its torch weights. It is taken on the
    matrix's top-left corner (a rescaled corner is the corner of the rescaled matrix): reading a 1B
    model's whole lm_head in float64 took 2 GB, the corner takes 2 MB and reads only its own pages.
    """
    corner = weight[:_SIGNATURE_CORNER, :_SIGNATURE_CORNER]
    if isinstance(corner, torch.Tensor):  # a torch weight may be bf16, which numpy has no type for
        corner = corner.double().numpy()
    a = np.abs(np.asarray(corner, np.float64)) + 1e-12
    for _ in range(4):
        a /= a.sum(axis=0, keepdims=True)
        a /= a.sum(axis=1, keepdims=True)
    flat = a.ravel()
    points = np.random.default_rng(0).choice(flat.size, size=min(_SIGNATURE_POINTS, flat.size), replace=False)
    sample = flat[np.sort(points)]
    return (sample - sample.mean()) / (sample.std() + 1e-30)


def match_layers(ops: list[dict[str, Any]], layers: dict[str, np.ndarray]) -> dict[str, str]:
    """Op scope -> torch layer name, by best signature correlation among equal shapes: one op per layer,
    then every other op reading that very weight (ALBERT's one layer, shared by every position in its
    stack, is as many ops as the stack is deep; an op left out of the recipe keeps a float copy)."""
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
    signature_of = {op["scope"]: op["signature"] for op in ops}
    first_reader = {name: signature_of[scope] for scope, name in matched.items()}
    for score, scope, name in sorted(pairs, reverse=True):
        if scope not in matched and name in first_reader and np.array_equal(signature_of[scope], first_reader[name]):
            matched[scope] = name
    return matched


class _Keywords(torch.nn.Module):
    """A module with keyword inputs and a dict of outputs, so litert-torch names the signature's tensors
    after them (it names positional ones ``args_0``, ``output_0``)."""

    def __init__(self, module: torch.nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.module, self.inputs, self.outputs = module, inputs, outputs

    def forward(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(*(tensors[name] for name in self.inputs))
        return dict(zip(self.outputs, out if isinstance(out, (tuple, list)) else (out,)))


def _exported_bytes(converted: Any) -> bytes:
    """A litert-torch conversion's flatbuffer (it writes only to a file)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "float.tflite"
        converted.export(str(path))
        return path.read_bytes()


def float_flatbuffer(model: LoadedModel, spec: ArtifactSpec) -> bytes:
    if model.fingerprint not in _float_cache:
        import litert_torch

        try:
            converted = litert_torch.convert(_Keywords(model.module, model.input_names, model.output_names), (),
                                             dict(zip(model.input_names, model.sample_inputs)))
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConversionError(spec.filename, f"litert-torch could not convert the model: {text}") from exc
        _float_cache[model.fingerprint] = _exported_bytes(converted)
    return _float_cache[model.fingerprint]


def _interpreter(model_content: bytes | None = None, path: Path | None = None) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content) if model_content else Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def fully_connected_ops(flatbuffer: bytes | Path) -> list[dict[str, Any]]:
    """Each FULLY_CONNECTED op of a float model, in every subgraph: its output tensor name, weight digest
    and shape."""
    model = tflite_ops.Flatbuffer(flatbuffer)
    ops = []
    for op in tflite_ops.fully_connected(model):
        values = model.constant(op.subgraph, op.inputs[1])  # a view: the signature reads its corner only
        if values is None:  # computed, not constant
            continue
        ops.append({"scope": model.name(op.subgraph, op.outputs[0]), "signature": weight_signature(values),
                    "shape": tuple(values.shape)})
    return ops


def build(model: LoadedModel, program: torch.export.ExportedProgram | None, spec: ArtifactSpec, destination: Path) -> Built:
    if model.seq2seq is not None:
        return build_seq2seq(model, spec, destination)
    if model.language is not None:
        return build_decoder(model, spec, destination)
    scheme = SCHEMES[spec.quant]
    plan = plan_layers(model.module, scheme, spec.group_size, spec.skip_layers)
    flatbuffer = float_flatbuffer(model, spec)
    if scheme.weight_bits is None:
        destination.write_bytes(flatbuffer)
        return Built(layers=plan)
    quantised, layers, count = _quantise_matched(flatbuffer, model.module, plan, spec)
    destination.write_bytes(quantised)
    return Built(layers=layers, details={"fully_connected_ops": count})


def _quantise_matched(flatbuffer: bytes, module: torch.nn.Module, plan: list[LayerDecision],
                      spec: ArtifactSpec, embedding_lookups: bool = False) -> tuple[bytes, list[LayerDecision], int]:
    """The planned linears' FULLY_CONNECTED ops (in every signature) quantised with the spec's scheme."""
    weights = {name: m.weight.detach().numpy() for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    ops = fully_connected_ops(flatbuffer)
    layer_of = match_layers(ops, weights)
    chosen = {d.name for d in plan if d.quantised}
    selected = [op for op in ops if layer_of.get(op["scope"]) in chosen]
    quantised_bytes = _quantise(flatbuffer, selected, library_config("tflite", spec.quant, spec.group_size), spec,
                                embedding_lookups)
    return quantised_bytes, _confirm(plan, ops, layer_of, quantised_bytes), len(ops)


def build_seq2seq(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """A T5 as one flatbuffer with two signatures: ``encode`` (the encoder, and every decoder layer's
    cross-attention keys and values) and ``decode`` (one token; LiteRT keeps no state in the model, so the
    caller passes the self-attention cache in and writes the step's keys and values back)."""
    import litert_torch

    from .. import seq2seq

    task = model.seq2seq
    t5 = task.model  # converted as it is: the quantiser works on the flatbuffer, not on the module
    encode, decode = seq2seq.Encode(t5).eval(), seq2seq.DecodeWithCacheInput(t5, task.max_target).eval()
    ids = torch.zeros(1, task.source_len, dtype=torch.long)
    mask = torch.ones(1, task.source_len, dtype=torch.long)
    with torch.no_grad():
        cross = encode(ids, mask)
    self_kv = torch.zeros(cross.shape[0], task.max_target, *cross.shape[1:2], cross.shape[3])
    decode_inputs = {"token": torch.zeros(1, 1, dtype=torch.long), "position": torch.tensor([0]), "cross_kv": cross,
                     "attention_mask": mask, "self_kv": self_kv}
    try:
        converted = (litert_torch.signature("encode", _Keywords(encode, ("input_ids", "attention_mask"), ("cross_kv",)),
                                            sample_kwargs={"input_ids": ids, "attention_mask": mask})
                     .signature("decode", _Keywords(decode, tuple(decode_inputs), ("logits", "step_kv")),
                                sample_kwargs=decode_inputs)
                     .convert())
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConversionError(spec.filename, f"litert-torch could not convert the encode/decode steps: {text}") from exc
    flatbuffer = _exported_bytes(converted)
    plan = plan_layers(t5, SCHEMES[spec.quant], spec.group_size, spec.skip_layers)
    details: dict[str, Any] = {"signatures": ["encode", "decode"], "source_len": task.source_len,
                               "max_target": task.max_target}
    if spec.smoothing:
        details["options_not_applied"] = {"smoothing": "SmoothQuant is calibrated for decoder-only models"}
    if SCHEMES[spec.quant].weight_bits is None:
        destination.write_bytes(flatbuffer)
        return Built(layers=plan, details=details)
    # Each signature holds its own copy of the embedding table: int8 makes both four times smaller.
    quantised, layers, count = _quantise_matched(flatbuffer, t5, plan, spec, embedding_lookups=True)
    destination.write_bytes(quantised)
    tables = tflite_ops.embedding_tables(tflite_ops.Flatbuffer(quantised))
    lookups = [{"shape": list(shape), "int8": integers} for shape, integers in tables]
    return Built(layers=layers, details={**details, "fully_connected_ops": count, "embedding_lookups": lookups})


def seq2seq_stepper(path: Path, backend: str = "litert") -> Any:
    """Both signatures with the self-attention cache kept between tokens: the device runner's own stepper."""
    from device_tests.runner import TfliteSeq2Seq

    return TfliteSeq2Seq(path)


def _confirm(plan: list[LayerDecision], ops: list[dict[str, Any]], layer_of: dict[str, str],
             quantised: bytes | Path) -> list[LayerDecision]:
    scopes = quantised_scopes(quantised)
    found = {layer_of[op["scope"]]: "" for op in ops if op["scope"] in scopes and op["scope"] in layer_of}
    return confirm(plan, found, "no quantised FULLY_CONNECTED weight found for it in the flatbuffer")


def _quantise(flatbuffer: bytes, ops: list[dict[str, Any]], config: dict[str, Any], spec: ArtifactSpec,
              embedding_lookups: bool = False) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.qtyping import TFLOperationName

    manager = recipe_manager.RecipeManager()
    granularity = config["granularity"]
    if embedding_lookups and granularity in (qtyping.QuantGranularity.CHANNELWISE, qtyping.QuantGranularity.TENSORWISE):
        # int8 tables, with the fully-connected ops' granularity: a table tied to the lm_head is then one
        # int8 tensor for both (mixed granularities make the quantiser insert a dequantise it fails on).
        # Block-wise schemes leave the tables float; the manifest reports how each is stored.
        manager.add_weight_only_config(regex=".*", operation_name=TFLOperationName.EMBEDDING_LOOKUP, num_bits=8,
                                       granularity=granularity)
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


def quantised_scopes(flatbuffer: bytes | Path) -> set[str]:
    """Output names of FULLY_CONNECTED ops (in every subgraph) whose weight is stored as integers."""
    model = tflite_ops.Flatbuffer(flatbuffer)
    return {model.name(op.subgraph, op.outputs[0]) for op in tflite_ops.with_integer_weights(model)}


def load(path: Path, backend: str = "litert") -> Runner:
    from device_tests.runner import tflite_runner  # what a device runs, so host and device feed alike

    return tflite_runner(str(path))


def inspect(path: Path) -> Signature:
    """The signature a caller runs: the only one, or ``decode`` for language models (per generated token)."""
    interpreter = _interpreter(path=path)
    names = list(interpreter.get_signature_list())
    if sorted(names) == ["decode", "encode"]:  # a text-to-text model: both steps, prefixed with their names
        shown = ["encode", "decode"]
    else:
        shown = ["decode" if "decode" in names and len(names) > 1 else names[0]]

    from device_tests.runner import signature_order

    def specs(details: dict[str, Any], kind: str, prefix: str) -> tuple[TensorSpec, ...]:
        ordered = signature_order(interpreter, details, kind)
        return tuple(TensorSpec(prefix + k, np.dtype(details[k]["dtype"]).name, tuple(int(s) for s in details[k]["shape"]))
                     for k in ordered)

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    for name in shown:
        runner = interpreter.get_signature_runner(name)
        prefix = f"{name}." if len(shown) > 1 else ""
        inputs += specs(runner.get_input_details(), "inputs", prefix)
        outputs += specs(runner.get_output_details(), "outputs", prefix)
    return Signature(inputs, outputs)


# --- language models -------------------------------------------------------------------------------

# Exported and checked by edgeship's tests.
LITERT_LM_ARCHITECTURES = {"llama", "qwen2", "qwen3", "phi3", "phi", "mistral", "smollm3", "gemma3_text", "gpt2",
                           "gpt_neox"}
PREFILL_LENGTH = 64  # prompt tokens the prefill signature takes at once; longer prompts go in chunks
_RECIPES = {"fp32": None, "int8-dynamic": "dynamic_wi8_afp32", "int8-weight": "weight_only_wi8_afp32"}
_hf_folders: dict[str, Path] = {}  # model fingerprint -> HF folder litert-torch reads (GGUFs are saved once)


def _recipe(spec: ArtifactSpec) -> str | None:
    if spec.quant in _RECIPES:
        return _RECIPES[spec.quant]
    if spec.quant in ("8da4w", "int4-weight") and spec.group_size in (32, 64):
        return f"{'dynamic' if spec.quant == '8da4w' else 'weight_only'}_wi4b{spec.group_size}_afp32"
    raise ConversionError(spec.filename, f"litert-torch's LLM exporter has no recipe for {spec.quant} "
                                         f"(group {spec.group_size}); use int8-dynamic, int8-weight or 8da4w with group 32/64")


def litert_config_additions(config: Any) -> dict[str, Any]:
    """Keys litert-torch's exporter reads that a family's config lacks: GPT-2's and GPT-NeoX's have no
    num_key_value_heads (each attention head has its own key and value, so it equals the head count)."""
    if getattr(config, "num_key_value_heads", None) is None:
        return {"num_key_value_heads": int(config.num_attention_heads)}
    return {}


def _hf_folder(model: LoadedModel, smoothing: float | None = None) -> Path:
    """The HF folder litert-torch reads: the source folder itself, the source's files beside a config
    with litert_config_additions, or fp32 weights written once (a GGUF source, or weights smoothed for
    this artifact)."""
    source = model.source
    additions = litert_config_additions(model.language.causal_lm.config)
    if source["kind"] == "hf-folder" and not smoothing and not additions:
        return Path(source["path"])
    key = f"{model.fingerprint}:{smoothing}"
    if key not in _hf_folders:
        folder = Path(tempfile.mkdtemp(prefix="edgeship-hf-"))
        atexit.register(shutil.rmtree, folder, True)
        if source["kind"] == "hf-folder" and not smoothing:
            for file in Path(source["path"]).iterdir():  # the weights are read where they are
                if file.name != "config.json":
                    (folder / file.name).symlink_to(file.resolve())
            config = json.loads((Path(source["path"]) / "config.json").read_text())
        else:
            config = _write_fp32_weights(model, smoothing, folder)
        (folder / "config.json").write_text(json.dumps({**config, **additions}, indent=2))
        _hf_folders[key] = folder
    return _hf_folders[key]


def _write_fp32_weights(model: LoadedModel, smoothing: float | None, folder: Path) -> dict[str, Any]:
    """The working copy's fp32 weights and the tokenizer written into ``folder``; returns the config."""
    from safetensors.torch import save_model

    from ..sources.decoder import conv1d_from_linears

    # transformers refuses save_pretrained on a model loaded from GGUF; the dequantised fp32 weights
    # and the config are all litert-torch needs (save_model stores tied weights once).
    causal_lm = model.language.working_copy()
    if smoothing:
        from ..smoothing import smooth

        maxima = model.language.calibration_maxima()
        smooth(causal_lm, model.language.tokenizer, smoothing, maxima=maxima)  # a tied lm_head stays tied (unsmoothed)
    conv1d_from_linears(causal_lm)  # GPT-2's checkpoints keep its projections transposed, as Conv1D
    save_model(causal_lm, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.language.tokenizer.save_pretrained(folder)
    return json.loads(causal_lm.config.to_json_string(use_diff=False))


# litert-torch's HF exporter runs in a child process: it patches modelling code and registers ops globally
# (an int8 export left later ExecuTorch lowerings of Qwen/Phi models failing in the same process), and
# its peak memory is returned to the system when it exits. Its lightweight conversion reads constants
# lazily: on the default model the child peaks at 2.63 GiB instead of 3.70 and takes 66 s instead of 79,
# with the same ops and the same top-1/KL/greedy numbers (docs/measurements.md "Export time and memory").
# Converted, it holds the float flatbuffer as bytes (fp32 weights: 4.6 GiB for a 1.2B model) and the torch
# model. So it writes that flatbuffer at once, lets go of the bytes and the torch weights and returns the
# freed heap (at SmolLM2-135M's shape it then waits at 1.37 GiB instead of 1.90; nothing after the write reads
# the weights for LITERT_LM_ARCHITECTURES: only gemma's per-layer embedder, not sent here, would), and waits
# before its second peak, ai-edge-quantizer, until the parent says go (a line on stdin, or the pipe closing):
# the parent says so when its own memory is low (build_decoder, with the source weights parked), not in the
# middle of a .pte lowering.
_EXPORT_HF = """
import contextlib, ctypes, gc, io, json, sys
from pathlib import Path
import torch
from litert_torch import model as litert_model
from litert_torch.generative.export_hf import export as export_hf
args = json.loads(sys.argv[1])

def drop_torch_weights():
    for module in [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]:
        for parameter in module.parameters(recurse=False):
            parameter.data = torch.empty(0, dtype=parameter.dtype)
    gc.collect()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)

write = litert_model.LiteRTModel.export
def write_then_wait(self, path):
    write(self, path)
    self.__init__(litert_model.FileExporter(path))  # lets go of the flatbuffer's bytes, read back from the file
    drop_torch_weights()
    (Path(args["work"]) / "written").touch()
    sys.stdin.readline()
litert_model.LiteRTModel.export = write_then_wait

with contextlib.redirect_stdout(io.StringIO()):
    export_hf.export(args["folder"], args["work"], prefill_lengths=[args["prefill"]], cache_length=args["cache"],
                     quantization_recipe=args["recipe"], bundle_litert_lm=True, keep_temporary_files=True,
                     experimental_lightweight_conversion=True)
"""


@dataclass
class _Running:
    """litert-torch's exporter in its child process, and the folder it writes into."""

    process: subprocess.Popen
    work: Path

    @property
    def waiting(self) -> bool:
        """Its float model written, its torch weights dropped, waiting to be told to quantise."""
        return (self.work / "written").is_file()

    def finish(self) -> tuple[int, str]:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()  # go
        code = self.process.wait()
        return code, (self.work / "stderr.txt").read_text(errors="replace")

    def cancel(self) -> None:
        self.process.kill()
        self.process.wait()
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        shutil.rmtree(self.work, ignore_errors=True)


_started: dict[tuple[str, str], _Running] = {}  # exports started ahead of their build, by _key


def _key(model: LoadedModel, spec: ArtifactSpec) -> tuple[str, str]:
    return model.fingerprint, spec.filename


def _launch(model: LoadedModel, spec: ArtifactSpec, work: Path) -> _Running:
    language = model.language
    return start_export_hf(_hf_folder(model, spec.smoothing), work, _recipe(spec),
                           min(PREFILL_LENGTH, language.max_context - 1), language.max_context)


def start_export_hf(folder: Path, work: Path, recipe: str | None, prefill: int, cache: int) -> _Running:
    """litert-torch's export of the HF folder into ``work``, started in its child process."""
    args = {"folder": str(folder), "work": str(work), "recipe": recipe, "prefill": prefill, "cache": cache}
    with open(work / "stderr.txt", "w") as log:  # a file, not a pipe: nobody reads a pipe while it runs ahead
        process = subprocess.Popen([sys.executable, "-c", _EXPORT_HF, json.dumps(args)], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=log)
    return _Running(process, work)


def _litert_refusal(model: LoadedModel) -> str | None:
    """Why litert-torch's LLM exporter cannot take this language model, or None."""
    architecture = model.language.architecture
    if architecture not in LITERT_LM_ARCHITECTURES:
        return (f"litert-torch's LLM exporter does not support {architecture} (it handles "
                f"{', '.join(sorted(LITERT_LM_ARCHITECTURES))}); the .pte artifacts cover this model")
    if model.source.get("pruned_linears"):
        return (f"litert-torch's LLM exporter builds the model from config.json, and this structurally pruned "
                f"checkpoint has {len(model.source['pruned_linears'])} linear layers narrower than the config says "
                "(its KV cache would take the config's head count); the .pte and .mlpackage artifacts cover this model")
    return None


def start_decoder(model: LoadedModel, spec: ArtifactSpec, folder: Path) -> None:
    """Start litert-torch's export of a language model now, so that its child process converts on the
    second core while this process builds the other artifacts; build_decoder collects it."""
    if _litert_refusal(model):
        return  # build_decoder reports why
    try:
        _recipe(spec)
    except ConversionError:
        return  # build_decoder reports it as this artifact's error; the others still build
    if _key(model, spec) not in _started:
        work = Path(tempfile.mkdtemp(prefix=".staging-litert-", dir=folder))  # removed by the next run if killed
        _started[_key(model, spec)] = _launch(model, spec, work)


def started_ahead(model: LoadedModel, spec: ArtifactSpec) -> bool:
    """Whether start_decoder started this artifact's export, not yet collected."""
    return _key(model, spec) in _started


def wait_until_converted(model: LoadedModel, spec: ArtifactSpec) -> None:
    """Until the export started ahead has written its float model and waits (or has ended): quantising
    and checking it can start from then on."""
    running = _started.get(_key(model, spec))
    while running is not None and not running.waiting and running.process.poll() is None:
        time.sleep(0.5)


def cancel_started() -> None:
    """Stop exports started ahead that the pipeline did not collect (it failed, or reused the artifact)."""
    while _started:
        _started.popitem()[1].cancel()


atexit.register(cancel_started)


def build_decoder(model: LoadedModel, spec: ArtifactSpec, destination: Path) -> Built:
    """Prefill/decode signatures with an external KV cache, and the .litertlm bundle LiteRT-LM apps load."""
    refusal = _litert_refusal(model)
    if refusal:
        raise ConversionError(spec.filename, refusal)
    recipe = _recipe(spec)
    language = model.language
    running = _started.pop(_key(model, spec), None)
    if running is None:
        running = _launch(model, spec, Path(tempfile.mkdtemp(prefix="litert-", dir=destination.parent)))
    code, stderr = running.finish()  # the export keeps the source weights parked while the child peaks
    work = running.work
    if code != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        text = (lines[-1] if lines else f"exit code {code}")[:300]
        shutil.rmtree(work, ignore_errors=True)
        raise ConversionError(spec.filename, f"litert-torch could not export the language model: {text}")
    produced = work / ("model_quantized.tflite" if recipe else "model.tflite")
    produced.replace(destination)
    bundle = destination.with_suffix(".litertlm")
    (work / "model.litertlm").replace(bundle)
    layers = _decoder_layer_report(model, spec, work / "model.tflite", destination)
    shutil.rmtree(work, ignore_errors=True)
    return Built(layers=layers, details={"recipe": recipe, "prefill_length": min(PREFILL_LENGTH, language.max_context - 1),
                                         "cache_length": language.max_context, "smoothing": spec.smoothing},
                 companions=[bundle.name])


def _decoder_layer_report(model: LoadedModel, spec: ArtifactSpec, float_path: Path, quantised_path: Path) -> list[LayerDecision]:
    causal_lm = model.language.working_copy(fp32=False)  # mapped: the signatures read only their corners
    plan = plan_layers(causal_lm, SCHEMES[spec.quant], spec.group_size, spec.skip_layers)
    if SCHEMES[spec.quant].weight_bits is None or not float_path.is_file():
        return plan
    weights = {name: m.weight.detach() for name, m in causal_lm.named_modules() if isinstance(m, torch.nn.Linear)}
    ops = fully_connected_ops(float_path)
    return _confirm(plan, ops, match_layers(ops, weights), quantised_path)


def lm_stepper(path: Path, backend: str = "litert") -> Any:
    """Drive the decode signature (and prefill for prompts), carrying the KV cache between calls: the
    device runner's own stepper, so host and device measure a .tflite the same way."""
    from device_tests.runner import tflite_lm_stepper

    return tflite_lm_stepper(path)
