"""A tiny HF checkpoint written as the GGUF llama.cpp's converter writes for its family.

Tensor names come from gguf-py's own name map; the converter's per-family changes are made here and
undone by transformers when it loads the file: Llama-layout query and key rows interleaved for llama.cpp's
rotary embedding (Llama, Mistral), Gemma's norms stored as 1 + gamma, GPT-2's Conv1D weights transposed
and its tied table written again as output.weight. The tokenizer is the default model's (SmolLM2's BPE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# HF model_type -> (gguf-py architecture, general.name: transformers tells Mistral from Llama by it)
ARCHITECTURES = {"llama": ("LLAMA", "tiny"), "mistral": ("LLAMA", "tiny-mistral"), "qwen2": ("QWEN2", "tiny"),
                 "qwen3": ("QWEN3", "tiny"), "phi3": ("PHI3", "tiny"), "gpt2": ("GPT2", "tiny"),
                 "gemma3_text": ("GEMMA3", "tiny")}


def _interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _metadata(writer: Any, config: Any, model_type: str) -> None:
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    hidden, heads = get("hidden_size", "n_embd"), get("num_attention_heads", "n_head")
    writer.add_block_count(get("num_hidden_layers", "n_layer"))
    writer.add_context_length(get("max_position_embeddings", "n_positions"))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(getattr(config, "intermediate_size", None) or config.n_inner or 4 * hidden)
    writer.add_head_count(heads)
    if model_type == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope.get("full_attention", rope)["rope_theta"]))  # Gemma 3: the global layers'

    writer.add_rope_dimension_count(head_dim)
    if model_type in ("qwen3", "gemma3_text"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if model_type == "gemma3_text":
        writer.add_sliding_window(config.sliding_window)


def write_family_gguf(folder: Path, path: Path, tokenizer_gguf: Path) -> Path:
    """``folder``'s tiny checkpoint (a tests.conftest.make_tiny_lm folder) as ``path``, fp32 tensors."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    arch_name, name = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    source = gguf.GGUFReader(str(tokenizer_gguf))
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    writer.add_vocab_size(config.vocab_size)
    _metadata(writer, config, config.model_type)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied and config.model_type != "gpt2":
            continue  # llama.cpp writes a tied table once, as token_embd
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        values = tensor.detach().float().numpy()
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf-py has no name for {hf_name} ({config.model_type})")
        if arch_name == "LLAMA" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            values = _interleaved(values, heads)
        if arch_name == "GEMMA3" and gguf_name.endswith("norm.weight"):
            values = values + 1
        if arch_name == "GPT2" and gguf_name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                                      "ffn_down.weight")):
            values = values.T  # transformers' Conv1D weights are [in, out]; undone on loading
        writer.add_tensor(gguf_name, np.ascontiguousarray(values, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
