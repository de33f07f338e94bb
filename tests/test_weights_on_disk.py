"""The source model's weights wait on disk during a build and come back exactly, tied weights still tied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.weights_on_disk import parked


def _tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False),
                                 "norm": torch.nn.LayerNorm(4)})
    model["head"].weight = model["embed"].weight
    return model


def test_parked_weights_are_gone_inside_and_exactly_back_after(tmp_path: Path) -> None:
    model = _tied_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with parked(model, tmp_path):
        assert all(p.numel() == 0 for p in model.parameters())
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model["head"].weight is model["embed"].weight  # still one parameter
    tokens = torch.tensor([1, 2])
    assert torch.equal(model["head"](model["embed"](tokens)), torch.nn.functional.linear(
        before["embed.weight"][tokens], before["embed.weight"]))


def test_weights_come_back_when_the_build_fails(tmp_path: Path) -> None:
    model = _tied_model()
    before = model["norm"].weight.detach().clone()
    with pytest.raises(RuntimeError, match="lowering failed"), parked(model, tmp_path):
        raise RuntimeError("lowering failed")
    assert torch.equal(model["norm"].weight, before)
    assert list(tmp_path.iterdir()) == []


def test_working_copies_made_while_parked_have_the_weights_and_change_alone(tmp_path: Path) -> None:
    model = _tied_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with parked(model, tmp_path) as working_copy:
        first, second = working_copy(), working_copy()
        for name, value in before.items():
            assert torch.equal(dict(first.named_parameters())[name], value), name
        assert first["head"].weight is first["embed"].weight  # tied in the copy too
        with torch.no_grad():
            first["norm"].weight.mul_(3)  # copy-on-write: neither the file nor the other copy changes
        assert torch.equal(second["norm"].weight, before["norm.weight"])
        assert all(p.numel() == 0 for p in model.parameters())
    assert torch.equal(model["norm"].weight, before["norm.weight"])



def test_a_working_copy_given_memory_of_its_own_lets_go_of_the_parked_file(tmp_path: Path) -> None:
    """After quantisation only a few float tensors of a copy are left; they must not keep the whole
    fp32 model mapped (the file stays in /proc/self/maps while any tensor lives in it)."""
    import gc

    from exporter.weights_on_disk import own_memory

    def mapped() -> bool:
        return str(tmp_path) in Path("/proc/self/maps").read_text()

    model = _tied_model()
    with parked(model, tmp_path) as working_copy:
        copy = working_copy()
        kept = copy["norm"].weight.detach().clone()
        copy["head"].weight = torch.nn.Parameter(torch.zeros(10, 4))  # as quantisation replaces the weights
        copy["embed"].weight = copy["head"].weight
        gc.collect()
        assert mapped()  # the norm still lives in the file
        own_memory(copy)
        gc.collect()
        assert not mapped()
        assert torch.equal(copy["norm"].weight, kept)
