"""Decoder-only causal language models: local HF checkpoint folders and GGUF files.

The loaded model carries a ``Language`` with the reference model (held in its checkpoint's dtype, computed
in fp32: ``precision``), its tokenizer, chat template and generation defaults; formats build their KV-cache
programs from fp32 working copies of it (see ``exporter.llm``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError
from ..weights_on_disk import parked
from . import precision, seq2seq
from .base import LoadedModel, SourceOptions, file_sha256, fingerprint
from .checkpoint import load_weights_checked, model_name, pruning_record, read_config, read_json, weights_fingerprint

# model_type -> family, for the architectures whose HF modelling code edgeship has exported and checked.
SUPPORTED = {"llama": "Llama (SmolLM/SmolLM2, TinyLlama)", "qwen2": "Qwen2/Qwen2.5", "qwen3": "Qwen3",
             "gpt2": "GPT-2", "phi3": "Phi-3", "phi": "Phi-2/Phi-1.5", "mistral": "Mistral", "smollm3": "SmolLM3",
             "gemma3_text": "Gemma 3 (270M, 1B)", "gpt_neox": "GPT-NeoX/Pythia", "gpt_neo": "GPT-Neo"}
# GGUF architecture -> model_type, for the supported families transformers reads from a GGUF (llama.cpp
# writes Mistral as "llama"; Phi-2, SmolLM3 and GPT-NeoX GGUFs it cannot read: their HF folders export).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "phi3": "phi3",
                      "gemma3": "gemma3_text"}
DEFAULT_CONTEXT = 512
# GGUF tensor types transformers can dequantise (gguf.GGMLQuantizationType names).
GGUF_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@dataclass
class Language:
    causal_lm: nn.Module  # the reference, never modified: fp32, or its checkpoint's bf16/fp16 (computing_in_fp32)
    tokenizer: Any
    max_context: int
    eos_ids: list[int]
    chat_template: str | None
    generation: dict[str, Any] = field(default_factory=dict)
    architecture: str = ""

    parked_copies: Callable[[], nn.Module] | None = field(default=None, repr=False)  # set while parked
    _calibration: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def working_copy(self, fp32: bool = True) -> nn.Module:
        """A copy of the reference model for a build to change (smooth, quantise, lower), in fp32: mapped
        from disk while the export keeps the reference parked, else a deep copy. ``fp32=False``: the weights
        as held (16-bit ones stay mapped), for a reader of a few of their values."""
        twin = self.parked_copies() if self.parked_copies else copy.deepcopy(self.causal_lm)
        return precision.upcast(twin) if fp32 else twin

    def computing_in_fp32(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The reference model with fp32 weights inside the block (the eager reference's computations)."""
        return precision.computing_in_fp32(self.causal_lm)

    def calibration_maxima(self) -> dict[str, torch.Tensor]:
        """Smoothing's activation maxima of the reference model (exporter.smoothing.activation_maxima),
        measured once and shared by every artifact that smooths: a forward pass over the calibration text,
        11 s for a 1.2B model. The export measures them beside its eager reference, while the weights are
        in fp32 anyway; measured later (the reference parked), they take an fp32 working copy for the pass."""
        if self._calibration is None:
            from ..smoothing import activation_maxima

            if self.parked_copies:
                self._calibration = activation_maxima(self.working_copy(), self.tokenizer)
            else:
                with self.computing_in_fp32() as model:
                    self._calibration = activation_maxima(model, self.tokenizer)
        return self._calibration

    @contextlib.contextmanager
    def reference_parked(self, folder: Path) -> Iterator[None]:
        """The builds' phase: the reference's weights wait on disk (its answers are computed by then) and
        every working copy maps them from there."""
        with parked(self.causal_lm, folder) as copies:
            self.parked_copies = copies
            try:
                yield
            finally:
                self.parked_copies = None

    def encode_chat(self, question: str) -> list[int]:
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(question)["input_ids"]]


def _check_architecture(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED:
        raise SourceError(f"{where}: architecture '{model_type}' is not supported for language models; "
                          f"supported: {', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")


def _context(config: Any, options: SourceOptions, where: str) -> int:
    limit = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
    window = sliding_window(config)
    wanted = options.context_len or min(DEFAULT_CONTEXT, limit, window or limit)
    if wanted > limit:
        raise SourceError(f"{where}: --context-len {wanted} is larger than the model supports ({limit} positions)")
    if window and wanted > window:
        # The program's KV cache attends over all of it in every layer: the model's own computation only
        # while the whole context fits in its sliding layers' window.
        raise SourceError(f"{where}: --context-len {wanted} is longer than the model's sliding attention window "
                          f"({window} tokens), which edgeship's KV cache does not apply; use --context-len {window} "
                          "or less")
    if wanted < 16:
        raise SourceError(f"--context-len {wanted} is too small; use at least 16")
    return wanted


def sliding_window(config: Any) -> int | None:
    """The attention window of the model's sliding-window layers (Gemma 3, Mistral, GPT-Neo's local
    layers), None if it has none."""
    if "local" in (getattr(config, "attention_layers", None) or []):
        return int(config.window_size)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if getattr(config, "use_sliding_window", True) else None


def _eos_ids(tokenizer: Any, config: Any, generation: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for value in source if isinstance(source, list) else [source]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end_of_turn is not None and end_of_turn not in ids:
        ids.append(int(end_of_turn))  # ChatML models end an answer with <|im_end|>
    return ids


def linears_from_conv1d(model: nn.Module) -> int:
    """GPT-2 keeps its projections in HF's Conv1D (a transposed linear); make them nn.Linear so that every
    backend's linear quantisation and the layer report see them. Exactly the same function."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def conv1d_from_linears(model: nn.Module) -> int:
    """linears_from_conv1d undone: the layers the family's HF modelling code keeps as Conv1D become Conv1D
    again, so that the model saves as its family's checkpoints do."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    swapped = 0
    for name, module in skeleton.named_modules():
        if isinstance(module, Conv1D):
            linear = model.get_submodule(name)
            conv = Conv1D(linear.out_features, linear.in_features)
            conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            model.set_submodule(name, conv)
            swapped += 1
    return swapped


def _finish(causal_lm: nn.Module, tokenizer: Any, name: str, source: dict[str, Any], print_: str,
            options: SourceOptions, where: str, generation: dict[str, Any]) -> LoadedModel:
    causal_lm.eval().requires_grad_(False)
    linears_from_conv1d(causal_lm)
    config = causal_lm.config
    max_context = _context(config, options, where)
    language = Language(
        causal_lm=causal_lm, tokenizer=tokenizer, max_context=max_context,
        eos_ids=_eos_ids(tokenizer, config, generation), chat_template=getattr(tokenizer, "chat_template", None),
        generation=generation, architecture=config.model_type,
    )
    sample = (torch.tensor([[int(tokenizer.bos_token_id or 0)] * 4]), torch.tensor([0]))
    return LoadedModel(
        name=name, module=causal_lm, input_names=("tokens", "input_pos"), output_names=("logits",),
        sample_inputs=sample, source={**source, "architecture": config.model_type, "context_len": max_context},
        fingerprint=fingerprint(print_, str(max_context)), logits_outputs=frozenset({"logits"}),
        language=language,
    )


def _tokenizer(loader_folder: Path, where: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(loader_folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise SourceError(f"{where}: no usable tokenizer ({str(exc).splitlines()[0][:200]}); a language model "
                          "export needs tokenizer.json or tokenizer.model next to the weights") from exc


def load_folder(folder: Path, options: SourceOptions) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = read_config(folder)
    _check_architecture(config.get("model_type", "?"), str(folder))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SourceError(f"{folder}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json); a language "
                          "model needs one for an app-ready bundle. Save it with tokenizer.save_pretrained(folder)")
    tokenizer = _tokenizer(folder, str(folder))
    _check_vocabulary(len(tokenizer), config.get("vocab_size"), folder)
    causal_lm = load_weights_checked(AutoModelForCausalLM, folder, dtype=precision.held_dtype(config))
    precision.fp32_buffers(causal_lm)
    generation_file = folder / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else {}
    source = {"kind": "hf-folder", "path": str(folder.resolve()), "task": "text-generation",
              **pruning_record(causal_lm)}
    return _finish(causal_lm, tokenizer, model_name(folder), source, weights_fingerprint(folder), options, str(folder),
                   generation)


def _check_vocabulary(tokens: int, rows: Any, folder: Path) -> None:
    """A tokenizer with more tokens than the embedding has rows gives ids the model cannot look up: the
    folder's tokenizer belongs to another model."""
    if isinstance(rows, int) and tokens > rows:
        raise SourceError(f"{folder}: the tokenizer has {tokens} tokens but the model's vocabulary (config.json "
                          f"vocab_size) has {rows}; its ids >= {rows} have no embedding row. Save this model's own "
                          "tokenizer into the folder (tokenizer.save_pretrained(folder))")


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Read the GGUF header and tensor table; refuse truncated files and quant types we cannot read."""
    import gguf

    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise SourceError(f"{path}: not a GGUF file (bad magic); is it a complete download?")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # numpy/mmap errors on a cut-short file
        raise SourceError(f"{path}: the GGUF file is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise SourceError(f"{path}: the GGUF file is truncated (tensor {tensor.name} ends past the end of the file)")
        kind = tensor.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
    unsupported = sorted(set(types) - GGUF_TYPES)
    if unsupported:
        raise SourceError(f"{path}: tensor type(s) {', '.join(unsupported)} cannot be read; "
                          f"supported GGUF types: {', '.join(sorted(GGUF_TYPES))}")
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field else "?"
    return {"architecture": architecture, "tensor_types": types, "tensor_names": [t.name for t in reader.tensors]}


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside: every GGUFReader of a path, and every tensor-name map, is built once and shared.

    transformers parses the whole GGUF again for the config, the tokenizer and the weights, and builds
    a tensor-name map for every module it visits; parsing the 49k-entry vocabulary four times and 400
    identical maps were 11 of the 17 s loading the default model took (now 6.7 s, the same weights). Both are read, never changed.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(original_reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def load_gguf(path: Path, options: SourceOptions) -> LoadedModel:
    with _gguf_parsed_once():
        return _load_gguf(path, options)


def _load_gguf(path: Path, options: SourceOptions) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    header = inspect_gguf(path)
    if header["architecture"] in seq2seq.GGUF_ARCHITECTURES:
        return seq2seq.load_gguf(path, header, options)
    if header["architecture"] not in GGUF_ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture '{header['architecture']}' is not supported; edgeship reads "
                          f"GGUFs of {', '.join(sorted(set(GGUF_ARCHITECTURES) | seq2seq.GGUF_ARCHITECTURES))} (Mistral's are 'llama'); the other "
                          f"supported families export from their HF folder: "
                          f"{', '.join(sorted(set(SUPPORTED) - set(GGUF_ARCHITECTURES.values()) - {'mistral'}))}")
    tokenizer = _tokenizer(path.parent, str(path), gguf_file=path.name)
    try:
        causal_lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                         local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceError(f"{path}: transformers could not load this GGUF ({str(exc).splitlines()[0][:200]})") from exc
    # The GGUF's quantisation config (and transformers' quantiser object) would stop save_pretrained and are
    # not ours to carry further: the weights are plain fp32 tensors now.
    if getattr(causal_lm.config, "quantization_config", None) is not None:
        del causal_lm.config.quantization_config
    causal_lm.hf_quantizer = None
    name = path.stem.replace(".", "-").lower()
    generation = {k: v for k, v in causal_lm.generation_config.to_dict().items()
                  if k in ("eos_token_id", "bos_token_id", "temperature", "top_p", "top_k")}
    return _finish(causal_lm, tokenizer, name, {"kind": "gguf", "path": str(path.resolve()), "task": "text-generation",
                   "gguf_tensor_types": header["tensor_types"]}, file_sha256(path), options, str(path), generation)
