"""A bf16 or fp16 checkpoint is held in its own dtype and computed in fp32: the reference it gives is the
one the same checkpoint loaded in fp32 gives, to the bit, and its parked weights take half the bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import lm_parity
from exporter.sources import SourceOptions, load_model
from exporter.sources.precision import held_dtype

from tests.conftest import make_tiny_lm


def _sixteen_bit_copy(folder: Path, dtype: torch.dtype, destination: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dtype).save_pretrained(destination)
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(destination)
    return destination


def _fp32_loaded(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("architecture, dtype", [("llama", torch.bfloat16), ("gemma3_text", torch.bfloat16),
                                                 ("qwen2", torch.float16)])
def test_a_16_bit_checkpoint_is_held_in_its_dtype_and_its_reference_is_the_fp32_one(
        tmp_path: Path, smollm2_tokenizer_folder: Path, architecture: str, dtype: torch.dtype) -> None:
    # Gemma 3 at hidden size 80: its embedding scale sqrt(80) is not a bf16 number, and is not stored.
    overrides = {"hidden_size": 80, "head_dim": 20} if architecture == "gemma3_text" else {}
    made = make_tiny_lm(tmp_path / "fp32", architecture, smollm2_tokenizer_folder, **overrides)
    folder = _sixteen_bit_copy(made, dtype, tmp_path / "sixteen")
    language = load_model(str(folder), SourceOptions(context_len=96)).language
    held = {name: p.detach().clone() for name, p in language.causal_lm.named_parameters()}
    assert {p.dtype for p in held.values()} == {dtype}

    with language.computing_in_fp32():
        got = lm_parity.reference(language)
    want = lm_parity.reference(dataclasses.replace(language, causal_lm=_fp32_loaded(folder)))
    for kind in want.logits:
        np.testing.assert_array_equal(got.logits[kind], want.logits[kind], err_msg=kind)
    assert got.greedy == want.greedy

    for name, parameter in language.causal_lm.named_parameters():  # its own dtype again, the same values
        assert parameter.dtype == dtype and torch.equal(parameter, held[name]), name
    copy = language.working_copy()
    fp32 = dict(_fp32_loaded(folder).named_parameters())
    for name, parameter in copy.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, fp32[name]), name


def test_parked_16_bit_weights_take_half_the_bytes_and_copies_come_out_in_fp32(
        tmp_path: Path, smollm2_tokenizer_folder: Path) -> None:
    made = make_tiny_lm(tmp_path / "fp32", "llama", smollm2_tokenizer_folder)
    language = load_model(str(_sixteen_bit_copy(made, torch.bfloat16, tmp_path / "bf16")), SourceOptions()).language
    count = sum(p.numel() for p in language.causal_lm.parameters())
    staging = tmp_path / "staging"
    staging.mkdir()
    with language.reference_parked(staging):
        (parked_file,) = staging.iterdir()
        assert parked_file.stat().st_size < 2 * count + 64 * 1024  # bf16 values and torch.save's framing
        copy = language.working_copy()
        assert {p.dtype for p in copy.parameters()} == {torch.float32}
        as_held = language.working_copy(fp32=False)
        assert {p.dtype for p in as_held.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in language.causal_lm.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("config, dtype", [
    ({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "float16"}, torch.float16),
    ({"torch_dtype": "torch.bfloat16"}, torch.bfloat16), ({"dtype": "float32"}, torch.float32),
    ({}, torch.float32), ({"torch_dtype": "float64"}, torch.float32)])
def test_the_held_dtype_is_the_checkpoints_when_16_bit_else_fp32(config: dict, dtype: torch.dtype) -> None:
    assert held_dtype(config) is dtype


class _FloatStageDone(Exception):
    """Raised where the .pte build lets go of the source mapping: its float stage is over."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.decoder = decoder


def _float_stage(monkeypatch: pytest.MonkeyPatch, model, spec) -> tuple[torch.nn.Module, list[dict[str, torch.dtype]]]:
    """The decoder as the .pte build leaves it before torch.export, and at each layer's quantisation the
    dtype of every linear weight still float."""
    from exporter.formats import pte

    def stop(decoder: torch.nn.Module) -> None:
        raise _FloatStageDone(decoder)

    seen: list[dict[str, torch.dtype]] = []
    quantise = pte.quantise

    def watch(source: torch.nn.Module, *args, **kwargs):
        seen.append({name: m.weight.dtype for name, m in source.named_modules()
                     if isinstance(m, torch.nn.Linear) and type(m.weight) in (torch.Tensor, torch.nn.Parameter)})
        return quantise(source, *args, **kwargs)

    monkeypatch.setattr(pte, "own_memory", stop)
    monkeypatch.setattr(pte, "quantise", watch)
    with pytest.raises(_FloatStageDone) as done:
        pte._build_xnnpack_decoder(model, model.language.working_copy(fp32=False), spec, Path("unused.pte"))
    return done.value.decoder, seen


def _values(decoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as plain numbers: a torchao weight by its data tensors."""
    values = {}
    for name, tensor in decoder.state_dict().items():
        for part in getattr(tensor, "tensor_data_names", None) or [None]:
            values[f"{name}.{part}" if part else name] = getattr(tensor, part) if part else tensor
    return values


def test_the_pte_build_makes_one_layer_fp32_at_a_time_and_gets_what_the_whole_model_at_once_gets(
        tmp_path: Path, smollm2_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 source's layers are upcast, smoothed and quantised one by one: when the first layer is
    quantised the second is still bf16, and the weights come out as from the whole model made fp32,
    smoothed and quantised at once."""
    from exporter.formats import pte
    from exporter.targets import load_target

    made = make_tiny_lm(tmp_path / "fp32", "llama", smollm2_tokenizer_folder, num_hidden_layers=3)
    model = load_model(str(_sixteen_bit_copy(made, torch.bfloat16, tmp_path / "bf16")), SourceOptions(context_len=64))
    spec = next(s for s in load_target("android").artifacts if s.format.value == "pte")  # smoothing, tied table

    by_layer, seen = _float_stage(monkeypatch, model, spec)
    first = [name for name in seen[0] if ".layers.0." in name]
    assert first and all(seen[0][name] == torch.float32 for name in first)
    assert {dtype for name, dtype in seen[0].items() if ".layers.0." not in name} == {torch.bfloat16}

    monkeypatch.setattr(pte, "_by_layer", lambda decoder: [(decoder.inner, frozenset(
        name for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)))])
    at_once, seen_once = _float_stage(monkeypatch, model, spec)
    assert {dtype for dtype in seen_once[0].values()} == {torch.float32}  # the comparison is with the whole at once
    got, want = _values(by_layer), _values(at_once)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
