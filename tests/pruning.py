"""Structured pruning as pruning tools do it: whole MLP neurons and attention heads removed, a different
number in each layer, the narrower linears saved with save_pretrained under the unchanged config."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn


def _narrowed(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    narrow = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    narrow.weight.data = weight.clone()
    if layer.bias is not None:
        narrow.bias.data = (layer.bias.detach()[rows] if rows is not None else layer.bias.detach()).clone()
    return narrow


def prune(block: nn.Module, outputs: tuple[str, ...], inputs: tuple[str, ...], keep: torch.Tensor) -> None:
    """Keep only the ``keep`` output rows of the ``outputs`` linears and the matching input columns of the
    ``inputs`` linears of ``block`` (dotted names)."""
    for names, axis in ((outputs, "rows"), (inputs, "cols")):
        for name in names:
            block.set_submodule(name, _narrowed(block.get_submodule(name), **{axis: keep}))


def strongest(layer: nn.Linear, count: int, group: int = 1) -> torch.Tensor:
    """The rows (in whole groups of ``group`` rows, an attention head's) of the ``count`` groups with the
    largest weight norm, in order: the magnitude criterion structured pruning tools start from."""
    norms = layer.weight.detach().reshape(-1, group * layer.in_features).norm(dim=1)
    groups = norms.topk(count).indices.sort().values
    return (groups[:, None] * group + torch.arange(group)).reshape(-1)


def save_pruned(model: nn.Module, source: Path, destination: Path) -> Path:
    """The pruned model saved beside a copy of the source folder's tokenizer files."""
    model.save_pretrained(destination)
    for path in source.iterdir():
        if path.name.startswith(("vocab", "tokenizer", "special_tokens", "merges", "chat_template")):
            shutil.copy(path, destination / path.name)
    return destination


def prune_llama(model: nn.Module, per_layer: list[tuple[int, int]]) -> None:
    """Each layer keeps (key/value heads, MLP neurons) of ``per_layer``, each key/value head with the query
    heads it serves (grouped-query attention stays grouped)."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    for layer, (kv_heads, neurons) in zip(model.model.layers, per_layer):
        kept = strongest(layer.self_attn.k_proj, kv_heads, head_dim)
        queries = torch.cat([torch.arange(h * groups * head_dim, (h + 1) * groups * head_dim)
                             for h in (kept[::head_dim] // head_dim).tolist()])
        prune(layer.self_attn, ("q_proj",), ("o_proj",), queries)
        prune(layer.self_attn, ("k_proj", "v_proj"), (), kept)
        prune(layer.mlp, ("gate_proj", "up_proj"), ("down_proj",), strongest(layer.mlp.up_proj, neurons))


def prune_bert(model: nn.Module, per_layer: list[tuple[int, int]]) -> None:
    """Each layer of a BERT keeps (attention heads, MLP neurons) of ``per_layer``."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer, (heads, neurons) in zip(model.base_model.encoder.layer, per_layer):
        attention = layer.attention
        kept = strongest(attention.self.query, heads, head_dim)
        prune(attention.self, ("query", "key", "value"), (), kept)
        prune(attention.output, (), ("dense",), kept)
        kept = strongest(layer.intermediate.dense, neurons)
        prune(layer.intermediate, ("dense",), (), kept)
        prune(layer.output, (), ("dense",), kept)


def make_pruned_bert(root: Path) -> tuple[Path, nn.Module]:
    """A tiny BERT classifier with one of two heads and 40 of 64 neurons left in layer 0, both heads and 24
    neurons in layer 1: its folder and the pruned model."""
    import transformers

    from tests.encoder_families import make_tiny_encoder

    folder = make_tiny_encoder(root / "bert", "bert", "sequence-classification")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    prune_bert(model, [(1, 40), (2, 24)])
    return save_pruned(model, folder, root / "pruned-bert"), model


def make_pruned_llama(root: Path, tokenizer_folder: Path) -> tuple[Path, nn.Module]:
    """A tiny Llama with one of two key/value heads (and its queries) and 96 of 128 neurons left in layer 0,
    80 neurons in layer 1: its folder and the pruned model."""
    import transformers

    from tests.conftest import make_tiny_lm

    folder = make_tiny_lm(root / "tiny-llama", "llama", tokenizer_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prune_llama(model, [(1, 96), (2, 80)])
    return save_pruned(model, folder, root / "pruned-llama"), model
