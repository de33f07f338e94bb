"""The tied embedding/lm_head table: one int8 table, looked up and multiplied, stored once in a .ptd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from exporter.errors import ConversionError
from exporter.formats import pte
from exporter.formats.tied_table import TiedEmbedding, tie, unsmoothing
from exporter.formats.xnnpack_linears import DynamicQuantLinear
from exporter.targets import load_target

VOCAB, DIM = 3000, 64


class TinyTied(nn.Module):
    """Embedding -> a float layer -> lm_head, the embedding reading the lm_head's int8 rows."""

    def __init__(self, unsmooth: torch.Tensor | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        weight = torch.randn(VOCAB, DIM)
        scale = weight.abs().amax(1) / 127
        self.head = DynamicQuantLinear(torch.round(weight / scale[:, None]).to(torch.int8), scale, None)
        self.embed = TiedEmbedding(self.head, unsmooth)
        self.mid = nn.Linear(DIM, DIM)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(ids)))


def test_unsmoothing_recovers_one_over_the_column_factors() -> None:
    table = torch.randn(VOCAB, DIM)
    s = torch.rand(DIM) * 4 + 0.25
    assert torch.allclose(unsmoothing(table, table * s), 1 / s, rtol=1e-5)
    assert unsmoothing(table, table.clone()) is None  # an unsmoothed head needs no multiply


def test_the_embedding_is_the_heads_rows_times_their_scales_undone_by_one_over_s() -> None:
    unsmooth = torch.rand(DIM) + 0.5
    model = TinyTied(unsmooth)
    ids = torch.tensor([[0, 7, 2999]])
    rows = model.head.weight_int.float() * model.head.weight_scale[:, None]
    assert torch.allclose(model.embed(ids)[0], rows[ids[0]] * unsmooth, atol=1e-6)
    assert model.embed.weight is model.head.weight_int  # one tensor, not a copy


def test_a_float_or_grouped_head_is_not_tied() -> None:
    causal = nn.Module()
    causal.get_input_embeddings = lambda: nn.Embedding(4, 64)  # type: ignore[method-assign]
    assert tie(causal, nn.Linear(64, 4), None) is None
    grouped = DynamicQuantLinear(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, bits=4)
    assert tie(causal, grouped, None) is None


def test_lowered_pair_stores_the_table_once_and_needs_its_data_file(tmp_path: Path) -> None:
    model = TinyTied(torch.rand(DIM) + 0.5).eval()
    ids = torch.tensor([[5, 1, 2998, 40]])
    program = torch.export.export(model, (ids,), strict=False)
    spec = next(a for a in load_target("android").artifacts if a.format.value == "pte")
    details, data_files = pte.lower(program, spec, tmp_path / "m.pte", shared_table=model.head.weight_int)
    assert data_files == ["m.ptd"] and details["non_delegated_ops"]  # the lookup stays outside XNNPACK
    table_bytes = VOCAB * DIM
    ptd = (tmp_path / "m.ptd").stat().st_size
    assert table_bytes < ptd < table_bytes * 1.2  # once (plus the row scales), not twice
    assert (tmp_path / "m.pte").stat().st_size < table_bytes * 0.5  # and not in the program
    got = pte.load(tmp_path / "m.pte")([ids.numpy()])[0]
    assert abs(got - model(ids).detach().numpy()).max() < 1e-3 * abs(got).max()
    (tmp_path / "m.ptd").rename(tmp_path / "elsewhere.ptd")  # the program cannot run without it
    with pytest.raises(ConversionError, match="cannot load the program"):
        pte.load(tmp_path / "m.pte")
