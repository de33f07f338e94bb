"""SmoothQuant-style smoothing: move activation outliers into the weights before int8 dynamic quantisation.

For a linear y = W x whose input x comes from an RMSNorm (gamma) or from an elementwise product with
another linear's output, x_j / s_j and W[:, j] * s_j give exactly the same y in float, and the scale is
folded into the producer (gamma_j / s_j, or that linear's output row j / s_j). With
s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), per-token int8 activations lose far less on the few
channels that carry outliers. Statistics come from calibration text that is not the evaluation text.

Layers carried exactly from a GGUF's 4-bit blocks (``gguf_blocks``) have no weight error to trade
against, so their factor is max|x_j|^alpha alone, shared by each block of 32 input channels (a block
keeps one scale and offset); the blocks are rescaled with the weights and stay exact.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch
from torch import nn

from .sources.gguf_blocks import GROUP, Blocks


def calibration_text() -> str:
    return resources.files("exporter.data").joinpath("calibration_text.txt").read_text()


def activation_maxima(model: nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The largest |input| of every linear layer of the float ``model`` over the calibration text, by layer
    name: what smoothing needs from a forward pass, the same for every copy of the same weights."""
    names = {layer: name for name, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    maxima: dict[str, torch.Tensor] = {}

    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        name = names[layer]
        seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen

    handles = [layer.register_forward_pre_hook(hook) for layer in names]
    ids = tokenizer(calibration_text())["input_ids"]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), 256):
                model(torch.tensor([ids[start:start + 256]]))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _column_maxima(weight: torch.Tensor, rows_at_once: int = 8192) -> torch.Tensor:
    """max |w| of each input column, a block of rows at a time: abs() of a whole lm_head would be a second
    copy of it for a moment (1.05 GB at Llama-3.2-1B's shape)."""
    return torch.stack([weight[start:start + rows_at_once].abs().amax(0)
                        for start in range(0, weight.shape[0], rows_at_once)]).amax(0)


def _scales(act_max: torch.Tensor, consumers: list[nn.Linear], alpha: float) -> torch.Tensor:
    weight_max = torch.stack([_column_maxima(c.weight.detach()) for c in consumers]).amax(0)
    return (act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def _block_scales(act_max: torch.Tensor, alpha: float, group: int) -> torch.Tensor:
    per_channel = act_max.clamp(min=1e-5) ** alpha
    return per_channel.reshape(-1, group).amax(-1).repeat_interleave(group)


# Families whose blocks are Llama's: an RMSNorm computing x * gamma feeds q/k/v alone, and another feeds
# gate/up alone. Others get no pairs: Gemma 3's norms compute x * (1 + gamma) and its post-attention norm
# is not the MLP's input; Phi-2's LayerNorm has a bias and feeds attention and MLP at once; GPT-2 and
# GPT-NeoX name their layers otherwise; Phi-3 fuses q/k/v and gate/up.
LLAMA_LAYOUT = {"llama", "qwen2", "qwen3", "mistral", "smollm3", "phi3"}


def pairs(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(producer, consumers) pairs in the Llama family layout; other layouts get none."""
    found: list[tuple[nn.Module, list[nn.Linear]]] = []
    if getattr(getattr(model, "config", None), "model_type", None) not in LLAMA_LAYOUT:
        return found
    for layer in getattr(model.base_model, "layers", []):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is not None and all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj")):
            found.append((layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj]))
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            found.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
            found.append((mlp.up_proj, [mlp.down_proj]))
    head, norm = model.get_output_embeddings(), getattr(model.base_model, "norm", None)
    embedding = model.get_input_embeddings()
    # Only an untied lm_head: rescaling a weight shared with the input embedding would change the lookups.
    if norm is not None and isinstance(head, nn.Linear) and head.weight is not getattr(embedding, "weight", None):
        found.append((norm, [head]))
    return found


def smooth(model: nn.Module, tokenizer: Any, alpha: float = 0.5, carried: dict[nn.Module, Blocks] | None = None,
           maxima: dict[str, torch.Tensor] | None = None,
           only: list[tuple[nn.Module, list[nn.Linear]]] | None = None) -> int:
    """Smooth ``model`` in place (float-equivalent), and the ``carried`` GGUF blocks of its linears
    with it; returns how many linears were rescaled. ``maxima``: activation_maxima of these weights,
    measured before (each artifact that smooths a copy of the same model needs the same), else measured here.
    ``only``: these of its ``pairs`` (a build that smooths and quantises one layer at a time)."""
    carried = carried or {}
    chosen = pairs(model) if only is None else only
    if maxima is None:
        maxima = activation_maxima(model, tokenizer)
    name_of = {layer: name for name, layer in model.named_modules()}
    rescaled = 0
    with torch.no_grad():
        for producer, consumers in chosen:
            if any(c in carried for c in consumers):
                s = _block_scales(maxima[name_of[consumers[0]]], alpha, GROUP)
            else:
                s = _scales(maxima[name_of[consumers[0]]], consumers, alpha)
            if isinstance(producer, nn.Linear):  # up_proj: scale its output rows (and bias)
                producer.weight.div_(s.unsqueeze(1))
                if producer.bias is not None:
                    producer.bias.div_(s)
                if producer in carried:
                    carried[producer].scale_rows(1 / s)
            else:  # an RMSNorm: scale gamma
                producer.weight.div_(s)
            for consumer in consumers:
                consumer.weight.mul_(s.unsqueeze(0))
                if consumer in carried:
                    carried[consumer].scale_columns(s)
                rescaled += 1
    return rescaled
