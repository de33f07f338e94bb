"""Encoder-decoder (T5) models made exportable as two steps an app calls:

- ``encode(input_ids [1, S], attention_mask [1, S]) -> cross_kv [2 * layers, heads, S, d_kv]``: the encoder
  runs once per input, and every decoder layer's cross-attention keys and values are computed from its
  output then, not at every generated token;
- ``decode(token [1, 1], position [1], cross_kv, attention_mask [1, S]) -> logits [1, vocab]``: one decoder
  token at ``position``, its self-attention keys and values written into a cache held in the program.

The source length S is fixed (inputs are padded, the mask marks real tokens); the decoder writes at most
``max_target`` tokens. T5's own layer norms and linears are called as they are; attention and the feed-forward
blocks are written out here because T5 adds a learned relative-position bias to unscaled scores, which the fused
attention kernels do not take.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# The methods of a text-to-text program, in the order an app calls them.
METHODS = ("encode", "decode")
_MASKED = -1e9  # added to the scores of padded source tokens and of decoder positions not written yet


def signature_names(stateful: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A text-to-text program's inputs and outputs, method by method. Stateful (Core ML's decode): the
    position is the length of ``decoder_mask``."""
    where = "decode.decoder_mask" if stateful else "decode.position"
    return (("encode.input_ids", "encode.attention_mask", "decode.token", where, "decode.cross_kv",
             "decode.attention_mask"), ("encode.cross_kv", "decode.logits"))


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key minus query): exact for small distances, then
    logarithmic up to ``max_distance``; the decoder (not bidirectional) only looks back."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    large = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = large.clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[1, H, q, d] over [1, H, k, d] with an additive bias broadcast to [1, H, q, k]; T5 does not scale."""
    weights = torch.softmax(query @ keys.transpose(-1, -2) + bias, dim=-1)
    return weights @ values


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[1, n, heads * d] -> [1, heads, n, d]"""
    return x.reshape(1, x.shape[1], heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[1, heads, n, d] -> [1, n, heads * d]"""
    return x.transpose(1, 2).reshape(1, x.shape[2], -1)


def _feed_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A T5LayerFF (norm, ReLU or gated-GELU feed-forward, residual), written out: transformers' own forward
    reads ``wo.weight``'s dtype, which a quantised linear swapped in for XNNPACK does not have."""
    dense = layer.DenseReluDense
    x = layer.layer_norm(hidden)
    x = dense.act(dense.wi_0(x)) * dense.wi_1(x) if hasattr(dense, "wi_0") else dense.act(dense.wi(x))
    return hidden + dense.wo(x)


def _padding_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """[1, S] of 1 (token) / 0 (padding) -> [1, 1, 1, S] additive bias."""
    return ((1 - attention_mask.float()) * _MASKED).reshape(1, 1, 1, -1)


class Encode(nn.Module):
    """input_ids [1, S], attention_mask [1, S] -> cross_kv [2 * decoder layers, heads, S, d_kv]."""

    def __init__(self, t5: nn.Module) -> None:
        super().__init__()
        config = t5.config
        self.inner = t5  # named like FlatModule's, so layer reports read the same for every model
        self.heads = config.num_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder, config = self.inner.encoder, self.inner.config
        length = input_ids.shape[1]
        positions = torch.arange(length)
        buckets = relative_buckets(positions[None, :] - positions[:, None], True,
                                   config.relative_attention_num_buckets, config.relative_attention_max_distance)
        first = encoder.block[0].layer[0].SelfAttention
        bias = first.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0) + _padding_bias(attention_mask)
        hidden = encoder.embed_tokens(input_ids)
        for block in encoder.block:
            norm, attention = block.layer[0].layer_norm, block.layer[0].SelfAttention
            x = norm(hidden)
            out = _attend(_heads(attention.q(x), self.heads), _heads(attention.k(x), self.heads),
                          _heads(attention.v(x), self.heads), bias)
            hidden = hidden + attention.o(_merge(out))
            hidden = _feed_forward(block.layer[-1], hidden)
        hidden = encoder.final_layer_norm(hidden)
        cross = []
        for block in self.inner.decoder.block:
            attention = block.layer[1].EncDecAttention
            cross += [_heads(attention.k(hidden), self.heads)[0], _heads(attention.v(hidden), self.heads)[0]]
        return torch.stack(cross)


class _DecoderStep(nn.Module):
    """What both decoder steps share: T5's decoder for one token at ``position``, its self-attention
    over the tokens so far left to ``_self_attention`` (a cache in the program, or one passed in)."""

    def __init__(self, t5: nn.Module, max_target: int) -> None:
        super().__init__()
        config = t5.config
        self.inner = t5  # named like FlatModule's, so layer reports read the same for every model
        self.heads = config.num_heads
        self.max_target = max_target
        # The bucket of each distance back from the query (0 .. max_target - 1): the decoder's position bias
        # is a lookup at (position - key index), so no logarithm runs per token.
        self.register_buffer("distance_buckets", relative_buckets(
            -torch.arange(max_target), False, config.relative_attention_num_buckets,
            config.relative_attention_max_distance), persistent=False)
        self.scale_output = (config.d_model ** -0.5) if getattr(
            config, "scale_decoder_outputs", config.tie_word_embeddings) else None

    def _register_caches(self, shape: tuple[int, ...]) -> None:
        """A key and a value cache buffer per decoder layer (``k_cache_0``, ``v_cache_0``, ...)."""
        for i in range(len(self.inner.decoder.block)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def _self_attention(self, layer: int, attention: nn.Module, x: torch.Tensor, position: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _position_bias(self, position: torch.Tensor) -> torch.Tensor:
        """[1, H, 1, max_target]: T5's learned bias at each cached token's distance back from ``position``,
        and the positions not written yet masked."""
        keys_at = torch.arange(self.max_target)
        distance = (position - keys_at).clamp(min=0)
        first = self.inner.decoder.block[0].layer[0].SelfAttention
        bias = first.relative_attention_bias(self.distance_buckets[distance]).transpose(0, 1)  # [H, T]
        return bias.reshape(1, self.heads, 1, self.max_target) + torch.where(
            keys_at <= position, 0.0, _MASKED).reshape(1, 1, 1, -1)

    def _logits(self, token: torch.Tensor, position: torch.Tensor, cross_kv: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = self.inner.decoder
        self_bias = self._position_bias(position)
        cross_bias = _padding_bias(attention_mask)
        hidden = decoder.embed_tokens(token)
        for i, block in enumerate(decoder.block):
            attention = block.layer[0].SelfAttention
            out = self._self_attention(i, attention, block.layer[0].layer_norm(hidden), position, self_bias)
            hidden = hidden + attention.o(_merge(out))
            cross = block.layer[1].EncDecAttention
            x = block.layer[1].layer_norm(hidden)
            out = _attend(_heads(cross.q(x), self.heads), cross_kv[2 * i].unsqueeze(0),
                          cross_kv[2 * i + 1].unsqueeze(0), cross_bias)
            hidden = hidden + cross.o(_merge(out))
            hidden = _feed_forward(block.layer[-1], hidden)
        hidden = decoder.final_layer_norm(hidden)[:, -1, :]
        if self.scale_output is not None:
            hidden = hidden * self.scale_output
        return self.inner.lm_head(hidden)


class Decode(_DecoderStep):
    """token [1, 1], position [1], cross_kv, attention_mask [1, S] -> logits [1, vocab]; the self-attention
    cache is a buffer per layer ([1, max_target, heads, d_kv], ExecuTorch's cache-update layout)."""

    def __init__(self, t5: nn.Module, max_target: int) -> None:
        super().__init__(t5, max_target)
        from .llm import _load_custom_ops

        _load_custom_ops()
        self._register_caches((1, max_target, self.heads, t5.config.d_kv))

    def _self_attention(self, layer: int, attention: nn.Module, x: torch.Tensor, position: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        start = self._start
        k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        torch.ops.llama.update_cache(attention.k(x).reshape(1, 1, self.heads, -1), k_cache, start)
        torch.ops.llama.update_cache(attention.v(x).reshape(1, 1, self.heads, -1), v_cache, start)
        return _attend(_heads(attention.q(x), self.heads), k_cache.transpose(1, 2), v_cache.transpose(1, 2), bias)

    def forward(self, token: torch.Tensor, position: torch.Tensor, cross_kv: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        start = position[0].item()
        torch._check_is_size(start)
        torch._check(start < self.max_target)
        self._start = start
        return self._logits(token, position, cross_kv, attention_mask)


class DecodeWithCacheInput(_DecoderStep):
    """For runtimes without state in the program (LiteRT): the caller keeps the self-attention cache.
    token [1, 1], position [1], cross_kv, attention_mask [1, S], self_kv [2 * layers, max_target, heads, d_kv]
    -> logits [1, vocab], step_kv [2 * layers, heads, d_kv]: the caller writes step_kv into self_kv at
    ``position`` before the next token (the step sees its own keys and values without it)."""

    def _self_attention(self, layer: int, attention: nn.Module, x: torch.Tensor, position: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        key = attention.k(x).reshape(1, self.heads, -1)  # [1, H, d]: this token's
        value = attention.v(x).reshape(1, self.heads, -1)
        self._step += [key[0], value[0]]
        here = (torch.arange(self.max_target) == position).reshape(-1, 1, 1)
        keys = torch.where(here, key, self._cache[2 * layer]).transpose(0, 1).unsqueeze(0)  # [1, H, T, d]
        values = torch.where(here, value, self._cache[2 * layer + 1]).transpose(0, 1).unsqueeze(0)
        return _attend(_heads(attention.q(x), self.heads), keys, values, bias)

    def forward(self, token: torch.Tensor, position: torch.Tensor, cross_kv: torch.Tensor,
                attention_mask: torch.Tensor, self_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._cache, self._step = self_kv, []
        logits = self._logits(token, position, cross_kv, attention_mask)
        return logits, torch.stack(self._step)


class StatefulDecode(_DecoderStep):
    """For Core ML (iOS 18+), which keeps buffers written in place as model state: token [1, 1], decoder_mask
    [1, 1, 1, position + 1] (zeros: the tokens so far, this one last), cross_kv, attention_mask [1, S] -> logits
    [1, vocab]. Where the token goes comes from the mask's length, as in the stateful decoder LMs, so no
    position value is needed in the graph; the cache is a buffer per layer ([1, heads, max_target, d_kv])."""

    def __init__(self, t5: nn.Module, max_target: int) -> None:
        super().__init__(t5, max_target)
        # One spare row: a mask as long as the whole cache would let torch.export specialise on that length.
        self._register_caches((1, self.heads, max_target + 1, t5.config.d_kv))

    def _self_attention(self, layer: int, attention: nn.Module, x: torch.Tensor, position: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        end = self._end
        k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        k_cache[:, :, end - 1:end, :] = _heads(attention.k(x), self.heads)
        v_cache[:, :, end - 1:end, :] = _heads(attention.v(x), self.heads)
        return _attend(_heads(attention.q(x), self.heads), k_cache[:, :, :end, :], v_cache[:, :, :end, :], bias)

    def _position_bias(self, position: torch.Tensor) -> torch.Tensor:
        end = self._end
        distance = (end - 1) - torch.arange(end)
        first = self.inner.decoder.block[0].layer[0].SelfAttention
        bias = first.relative_attention_bias(self.distance_buckets[distance]).transpose(0, 1)  # [H, end]
        return bias.reshape(1, self.heads, 1, end) + self._mask

    def forward(self, token: torch.Tensor, decoder_mask: torch.Tensor, cross_kv: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        self._end, self._mask = decoder_mask.shape[-1], decoder_mask
        return self._logits(token, torch.tensor([decoder_mask.shape[-1] - 1]), cross_kv, attention_mask)


def step_modules(t5: nn.Module, max_target: int) -> tuple[Encode, Decode]:
    return Encode(t5).eval(), Decode(t5, max_target).eval()


def export_methods(encode: Encode, decode: Decode, source_len: int) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of both steps at the fixed source length: the programs of a .pte's two methods."""
    ids = torch.zeros(1, source_len, dtype=torch.long)
    mask = torch.ones(1, source_len, dtype=torch.long)
    with torch.no_grad():
        cross = encode(ids, mask)
        return {"encode": without_unused_weights(torch.export.export(encode, (ids, mask), strict=False)),
                "decode": without_unused_weights(torch.export.export(
                    decode, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), cross, mask), strict=False))}


def export_core_ml_steps(t5: nn.Module, source_len: int, max_target: int) -> dict[str, tuple[Any, nn.Module, tuple]]:
    """torch.export of the steps as Core ML runs them: ``encode``, and ``decode`` with its cache as state
    (StatefulDecode: the mask's length, up to max_target, is the position). Each is (program, step, sample)."""
    encode, decode = Encode(t5).eval(), StatefulDecode(t5, max_target).eval()
    ids = torch.zeros(1, source_len, dtype=torch.long)
    mask = torch.ones(1, source_len, dtype=torch.long)
    with torch.no_grad():
        cross = encode(ids, mask)
        decode_sample = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 2), cross, mask)
        end = torch.export.Dim("end", min=1, max=max_target)
        return {"encode": (torch.export.export(encode, (ids, mask), strict=False), encode, (ids, mask)),
                "decode": (torch.export.export(decode, decode_sample, dynamic_shapes=(None, {3: end}, None, None),
                                               strict=False), decode, decode_sample)}


def without_unused_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop the weights a step never reads. Both steps hold the whole T5, and torch.export lifts every
    weight of the module; ExecuTorch drops unread float parameters but keeps unread buffers and constants,
    which is what quantised weights are: each method stored the other's int8 linears (a third of the
    Flan-T5-small .pte)."""
    import copy

    from torch.export.graph_signature import InputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    unread = [spec for spec in program.graph_signature.input_specs
              if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
              and not placeholders[spec.arg.name].users]
    if not unread:
        return program
    signature = copy.deepcopy(program.graph_signature)
    for spec in unread:
        signature.input_specs.remove(spec)
        program.state_dict.pop(spec.target, None)
        program.constants.pop(spec.target, None)
        program.graph.erase_node(placeholders[spec.arg.name])
    program._graph_signature = signature  # private, as ExecuTorch's own unused-parameter pass sets it
    program.graph_module.recompile()
    return program
