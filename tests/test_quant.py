from __future__ import annotations

import pytest

from exporter.quant import IMPLEMENTATIONS, SCHEMES, library_config, linears_not_called, plan_layers
from tests.models import Mlp


def test_plan_keeps_layers_that_do_not_divide_the_group_size_float_and_says_why() -> None:
    plan = {d.name: d for d in plan_layers(Mlp(), SCHEMES["8da4w"], 32)}
    assert plan["odd"].quantised is False
    assert plan["odd"].reason == "input width 10 is not a multiple of group_size 32"
    assert all(plan[n].quantised for n in ("embed", "block.0", "block.2", "head"))
    assert plan["head"].reason == "int4 groups of 32"


def test_plan_honours_skip_layers() -> None:
    plan = {d.name: d for d in plan_layers(Mlp(), SCHEMES["int8-dynamic"], None, ("head", "block\\..*"))}
    assert not plan["head"].quantised and "skip_layers" in plan["head"].reason
    assert not plan["block.0"].quantised and not plan["block.2"].quantised
    assert plan["odd"].quantised  # per-channel: any width works


def test_the_plan_says_how_sparse_each_float_weight_is() -> None:
    from tests.models import build_sparse_mlp

    plan = {d.name: d for d in plan_layers(build_sparse_mlp()[0], SCHEMES["int8-dynamic"], None)}
    assert plan["block.0"].sparsity == pytest.approx(0.5, abs=1e-3)
    assert plan["head"].sparsity == 0.0
    assert plan["block.0"].as_dict()["sparsity"] == pytest.approx(0.5, abs=1e-3)
    import torch

    from exporter.quant import zero_fraction

    assert zero_fraction(torch.empty(0)) is None  # a parked weight has no sparsity to report


def test_float_schemes_quantise_nothing() -> None:
    assert not any(d.quantised for d in plan_layers(Mlp(), SCHEMES["fp32"], None))


def test_a_linear_whose_weight_is_read_directly_is_found_and_hooks_are_removed() -> None:
    import torch

    class ReadsWeight(torch.nn.Module):  # as MobileBERT's masked-LM head reads its decoder
        def __init__(self) -> None:
            super().__init__()
            self.called, self.decoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.called(x) @ self.decoder.weight.t()

    module = ReadsWeight()
    assert linears_not_called(module, (torch.ones(2, 4),)) == {"decoder"}
    assert not module.called._forward_pre_hooks and not module.decoder._forward_pre_hooks


@pytest.mark.parametrize(("fmt", "scheme"), sorted(IMPLEMENTATIONS))
def test_every_scheme_maps_to_a_real_library_object(fmt: str, scheme: str) -> None:
    group = 32 if SCHEMES[scheme].grouped else None
    config = library_config(fmt, scheme, group)
    if SCHEMES[scheme].weight_bits is None:
        assert config is None
    elif fmt == "pte":
        assert type(config).__module__.startswith("torchao")
    elif fmt == "mlpackage":
        assert type(config).__name__ == "OpLinearQuantizerConfig"
        assert config.dtype.get_bitwidth() == SCHEMES[scheme].weight_bits
    else:
        assert config["num_bits"] == SCHEMES[scheme].weight_bits
