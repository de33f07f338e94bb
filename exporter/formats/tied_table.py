"""One int8 table for a tied embedding and lm_head, stored once in a .ptd file beside the .pte.

SmolLM2, Qwen2.5 and many small models use one matrix as both the input embedding and the lm_head.
Quantised apart they store it twice: an int8 embedding table in the program and the lm_head's int8
weight in XNNPACK's delegate (28 MB each for SmolLM2-135M, a sixth of the .pte). Here the embedding
looks up the lm_head's own int8 rows and scales with ExecuTorch's ``embedding_byte`` kernel, times 1/s
where SmoothQuant scaled the lm_head's columns by s (exact in float). ExecuTorch's serializer stores
identical bytes once, but its 1.5 runtime reads a constant of a non-delegated op from named data only
through an external data file, so both uses of the table are tagged for one ``.ptd``; ExecuTorch's
runners and apps take it beside the .pte (``data_path``, Android's ``LlmModule(..., dataPath)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .xnnpack_linears import DynamicQuantLinear

TAG = "tied_table"  # ExecuTorch names the data file after it; the pipeline renames it after the .pte


class TiedEmbedding(nn.Module):
    """Token ids -> the lm_head's int8 rows times their per-row scales (times 1/s if it was smoothed)."""

    def __init__(self, head: DynamicQuantLinear, unsmooth: torch.Tensor | None) -> None:
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)

        super().__init__()
        self.register_buffer("weight", head.weight_int)  # the very tensor: torch.export lifts it once
        self.register_buffer("scales", head.weight_scale)
        self.register_buffer("unsmooth", None if unsmooth is None else unsmooth.detach().float().contiguous())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, indices, dtype=torch.float32)
        return rows if self.unsmooth is None else rows * self.unsmooth


def is_tied(causal_lm: nn.Module) -> bool:
    head, embedding = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    return head is not None and head.weight is embedding.weight


def unsmoothing(table: torch.Tensor, smoothed_head: torch.Tensor) -> torch.Tensor | None:
    """1/s per column, where smoothed_head = table * s column by column (least squares, exact in float);
    None when the head was not rescaled."""
    cross = torch.zeros(table.shape[1], dtype=torch.float64)
    square = torch.zeros_like(cross)
    for start in range(0, table.shape[0], _ROWS_AT_ONCE):  # a 128k vocabulary in float64 at once took 6 GB
        rows = table.detach()[start:start + _ROWS_AT_ONCE].double()
        cross += (rows * smoothed_head.detach()[start:start + _ROWS_AT_ONCE].double()).sum(0)
        square += (rows * rows).sum(0)
    s = cross / square.clamp(min=1e-30)
    return None if torch.allclose(s, torch.ones_like(s)) else (1.0 / s).float()


_ROWS_AT_ONCE = 8192


def tie(causal_lm: nn.Module, head: nn.Module, unsmooth: torch.Tensor | None) -> str | None:
    """Point the input embedding at the int8 lm_head; its name, or None when the lm_head is not int8
    per channel (then there is no int8 table to share and the caller quantises the embedding itself)."""
    if not isinstance(head, DynamicQuantLinear) or head.quant_min != -128 or head.group != head.weight_int.shape[1]:
        return None
    embedding = causal_lm.get_input_embeddings()
    name = next(n for n, m in causal_lm.named_modules() if m is embedding)
    causal_lm.set_input_embeddings(TiedEmbedding(head, unsmooth))
    return name


def _placeholders_holding(program: Any, table: torch.Tensor) -> set[str]:
    """Names of the program's placeholders whose constant (parameter, buffer or lifted tensor) is the table."""
    signature = program.graph_signature
    by_name = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
               **signature.inputs_to_lifted_tensor_constants}
    found = set()
    for name, fqn in by_name.items():
        value = program.state_dict.get(fqn, program.constants.get(fqn))
        if (isinstance(value, torch.Tensor) and value.shape == table.shape and value.dtype == table.dtype
                and (value is table or torch.equal(value, table))):
            found.add(name)
    return found


def delegate_tagging(program: Any, table: torch.Tensor) -> Callable[[torch.fx.GraphModule], Any]:
    """A transform pass for to_edge_transform_and_lower: XNNPACK writes the lm_head's weight, tagged
    here before partitioning, into the tagged external data instead of the program."""
    from torch.fx.passes.infra.pass_base import PassResult

    names = _placeholders_holding(program, table)
    if not names:
        raise ValueError("the tied table is not among the program's constants")

    def tag(graph_module: torch.fx.GraphModule) -> PassResult:
        for node in graph_module.graph.nodes:
            if node.op == "placeholder" and node.name in names:
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = TAG
        return PassResult(graph_module, True)

    return tag


def tag_program_copies(edge: Any, table: torch.Tensor) -> int:
    """Tag the program's own copy of the table (the embedding's) for the same external data; how many."""
    program = edge.exported_program()
    names = _placeholders_holding(program, table)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.meta["constant_tag"] = TAG
    return len(names)
