"""Decoder-only language models made exportable: a KV cache inside the program, ExecuTorch's custom
SDPA and cache-update ops, last-token logits, and the metadata ExecuTorch's LLM runners read.

Hugging Face's own modelling code is kept (Llama, Qwen2/3, GPT-2, Phi-3 share it): attention is
routed through an attention function registered with transformers, which writes the step's keys
and values into per-layer cache buffers and attends over the cache with ``llama::custom_sdpa``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION_NAME = "edgeship_kv_sdpa"
# int8 embedding tables get one scale per 32 values: GGUF's Q8_0 blocking, so a Q8_0 table is carried
# over exactly (per-row scales measured 0.899 vs 0.906 next-token agreement on SmolLM2-135M).
EMBEDDING_GROUP = 32


def _load_custom_ops() -> None:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::*)


class _Step:
    """The start position (or Core ML's causal mask) of the current forward, shared by every attention layer."""

    start_pos: Any = 0
    mask: Any = None


def kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-function signature; query/key/value arrive as [batch, heads, seq, head_dim]."""
    start_pos = module.edgeship_step.start_pos
    q = query.transpose(1, 2)  # the custom ops want [batch, seq, heads, head_dim]
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    torch.ops.llama.update_cache(k, module.k_cache, start_pos)
    torch.ops.llama.update_cache(v, module.v_cache, start_pos)
    out = torch.ops.llama.custom_sdpa(q, module.k_cache, module.v_cache, start_pos, None, 0.0, True, scaling)
    return out, None  # already [batch, seq, heads, head_dim], which HF reshapes to hidden


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, kv_attention)
    # The causal mask is applied inside custom_sdpa from start_pos: HF need not build one.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention layers of a HF decoder: the classes are named *Attention and carry a layer_idx, or
    compute attention in their own ``_attn`` (GPT-Neo's, inside a wrapper that holds no projections)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and (hasattr(m, "layer_idx") or hasattr(m, "_attn"))]


def _route_own_attention(attention: nn.Module, attention_name: str) -> None:
    """GPT-Neo multiplies queries and keys in its own ``_attn`` (unscaled, with its local/global mask)
    instead of calling transformers' attention functions: send it through ``attention_name`` too. Both of
    edgeship's functions attend over the whole cache, which is the local layers' own computation while
    the context fits in their window (the source caps the context there)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    function = ALL_ATTENTION_FUNCTIONS[attention_name]

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
        out, _ = function(attention, query, key, value, attention_mask, scaling=1.0)
        return out.transpose(1, 2), None  # back to [batch, heads, seq, head_dim], which _attn returns

    attention._attn = attend


class _CachedDecoder(nn.Module):
    """A HF decoder (``self.inner``) whose attention layers hold their KV cache as buffers."""

    inner: nn.Module

    def reset(self) -> None:
        """Empty the KV cache (only the caches: RoPE's inv_freq is a buffer too)."""
        for attention in attention_modules(self.inner):
            attention.k_cache.zero_()
            attention.v_cache.zero_()


class ExportableDecoder(_CachedDecoder):
    """forward(tokens [1, seq], input_pos [1]) -> logits of the last token [1, vocab], KV cache inside.

    This is the calling convention of ExecuTorch's TextLLMRunner (prefill with the prompt at
    input_pos 0, then one token at a time).
    """

    def __init__(self, causal_lm: nn.Module, max_context: int) -> None:
        super().__init__()
        _load_custom_ops()
        register_attention()
        self.inner = causal_lm  # named like FlatModule's, so layer reports read the same for every model
        self.max_context = max_context
        # ExecuTorch's cache ops want [batch, position, kv_heads, head_dim]
        self.step = attach_kv_caches(causal_lm, ATTENTION_NAME, max_context, heads_first=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start < self.max_context)
        torch._check(start + tokens.shape[1] <= self.max_context)
        self.step.start_pos = start
        positions = torch.arange(tokens.shape[1], dtype=torch.long).unsqueeze(0) + input_pos
        hidden = self.inner.base_model(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
        return self.inner.get_output_embeddings()(hidden[:, -1, :])


def attach_kv_caches(causal_lm: nn.Module, attention_name: str, max_context: int, *, heads_first: bool) -> _Step:
    """Route a HF decoder's attention through ``attention_name`` and give every attention layer key and
    value cache buffers ([1, kv_heads, context, head_dim] when heads_first, else [1, context, kv_heads,
    head_dim]) and the step object they all read."""
    config = causal_lm.config
    config._attn_implementation = attention_name
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    step = _Step()
    for attention in attention_modules(causal_lm):
        # A structurally pruned checkpoint has fewer key/value heads in some layers: its key projection says.
        key = getattr(attention, "k_proj", None)
        heads_here = key.out_features // head_dim if isinstance(key, nn.Linear) else kv_heads
        shape = (1, heads_here, max_context, head_dim) if heads_first else (1, max_context, heads_here, head_dim)
        attention.edgeship_step = step
        attention.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        attention.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        if hasattr(attention, "_attn"):
            _route_own_attention(attention, attention_name)
    return step


COREML_ATTENTION = "edgeship_coreml_state"


def coreml_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over a KV cache that Core ML keeps as state. The step's keys and values are written into
    the cache buffers by slice assignment (coremltools turns in-place buffer writes into state updates);
    where they go comes from the causal mask's shape [1, 1, seq, end], so no position value is needed
    in the graph. query/key/value arrive as [batch, heads, seq, head_dim]."""
    mask = module.edgeship_step.mask
    end, count = mask.shape[-1], key.shape[2]
    module.k_cache[:, :, end - count:end, :] = key
    module.v_cache[:, :, end - count:end, :] = value
    keys, values = module.k_cache[:, :, :end, :], module.v_cache[:, :, :end, :]
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None  # [batch, seq, heads, head_dim], which HF reshapes to hidden


def causal_mask(start: int, count: int) -> torch.Tensor:
    """The mask a Core ML decoder step takes: ``count`` new tokens at ``start``, attending to all before."""
    rows = torch.arange(count).unsqueeze(1) + start
    columns = torch.arange(start + count).unsqueeze(0)
    return torch.where(columns <= rows, 0.0, float("-inf")).reshape(1, 1, count, start + count)


class StatefulDecoder(_CachedDecoder):
    """forward(input_ids [1, seq], causal_mask [1, 1, seq, end]) -> logits of the last token [1, vocab],
    with the KV cache as buffers that Core ML (iOS 18+) keeps as model state between predictions.

    The prompt goes in at once (end = its length), then one token per call (end grows by one); the
    caller owns the position through the mask, as in Apple's own stateful LLM examples.
    """

    def __init__(self, causal_lm: nn.Module, max_context: int) -> None:
        super().__init__()
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(COREML_ATTENTION, coreml_attention)
        AttentionMaskInterface.register(COREML_ATTENTION, lambda *args, **kwargs: None)
        self.inner = causal_lm
        self.max_context = max_context
        self.step = attach_kv_caches(causal_lm, COREML_ATTENTION, max_context, heads_first=True)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        end, count = causal_mask.shape[-1], input_ids.shape[1]
        self.step.mask = causal_mask
        positions = torch.arange(end - count, end, dtype=torch.long).unsqueeze(0)
        hidden = self.inner.base_model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
        return self.inner.get_output_embeddings()(hidden[:, -1, :])


def export_stateful(decoder: StatefulDecoder, bos: int) -> torch.export.ExportedProgram:
    """torch.export of a StatefulDecoder with a flexible step: ``seq`` new tokens ending at ``end``."""
    context = decoder.max_context
    sample = (torch.tensor([[bos] * 4]), causal_mask(0, 4))
    # end <= context - 1: torch.export guards the top value itself (it specialises on it).
    seq = torch.export.Dim("seq", min=1, max=context - 1)
    end = torch.export.Dim("end", min=1, max=context - 1)
    return torch.export.export(decoder, sample, dynamic_shapes=({1: seq}, {2: seq, 3: end}), strict=False)


def stateful_input_bounds(context: int) -> list[list[int]]:
    """The largest inputs of export_stateful's program (what ExecuTorch's method metadata reports)."""
    return [[1, context - 1], [1, 1, context - 1, context - 1]]


class QuantizedEmbedding(nn.Module):
    """An int8 embedding table with one scale per row (or per group), looked up by ExecuTorch's
    ``quantized_decomposed::embedding_byte`` kernel without dequantising the table."""

    def __init__(self, weight: torch.Tensor, group_size: int | None = None) -> None:
        super().__init__()
        vocab, dim = weight.shape
        group = group_size or dim
        blocks = weight.detach().float().reshape(vocab, dim // group, group)
        scales = blocks.abs().amax(-1).clamp(min=1e-12) / 127.0
        quantised = torch.round(blocks / scales.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
        self.register_buffer("weight", quantised.reshape(vocab, dim))
        self.register_buffer("scales", scales if group != dim else scales.squeeze(-1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, indices, dtype=torch.float32
        )

    def dequantised(self) -> torch.Tensor:
        scales = self.scales if self.scales.dim() == 2 else self.scales.unsqueeze(-1)
        vocab, dim = self.weight.shape
        return (self.weight.float().reshape(vocab, scales.shape[1], -1) * scales.unsqueeze(-1)).reshape(vocab, dim)


def quantise_embedding(model: nn.Module, group_size: int | None) -> str:
    """Swap the input embedding for an int8 one; returns the layer's name for the report."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)

    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    if group_size and embedding.weight.shape[1] % group_size:
        group_size = None
    model.set_input_embeddings(QuantizedEmbedding(embedding.weight, group_size))
    return name


def runner_metadata(config: Any, tokenizer: Any, max_context: int, eos_ids: list[int]) -> dict[str, Any]:
    """Constant methods ExecuTorch's TextLLMRunner (and its Android/iOS apps) read from the program."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "get_vocab_size": int(config.vocab_size),
        "get_bos_id": int(bos),
        "get_eos_ids": [int(e) for e in eos_ids],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_n_layers": int(config.num_hidden_layers),
    }
