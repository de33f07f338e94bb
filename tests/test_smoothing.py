from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from exporter.smoothing import LLAMA_LAYOUT, smooth
from exporter.sources import SourceOptions, load_model
from tests.conftest import TINY_LM_CONFIGS, make_tiny_lm


def test_smoothing_is_exact_in_float_and_flattens_activation_outliers(tmp_path: Path, smollm2_tokenizer_folder: Path) -> None:
    folder = make_tiny_lm(tmp_path / "tiny-llama", "llama", smollm2_tokenizer_folder)
    language = load_model(str(folder), SourceOptions(context_len=64)).language
    model = copy.deepcopy(language.causal_lm)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie, as the .pte does
    with torch.no_grad():
        # An outlier channel, as trained LLMs have: smoothing must move it from activations to weights.
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    ids = torch.tensor([language.tokenizer("The lighthouse keeper climbed the stairs.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    rescaled = smooth(model, language.tokenizer, 0.5)
    with torch.no_grad():
        after = model(ids).logits
    assert rescaled == 2 * 6 + 1  # per layer q, k, v, gate, up, down; then the lm_head
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert float(model.model.layers[0].input_layernorm.weight[5]) < 40.0 / 2


def test_tied_lm_head_is_left_alone(tmp_path: Path, smollm2_tokenizer_folder: Path) -> None:
    folder = make_tiny_lm(tmp_path / "tiny-qwen2", "qwen2", smollm2_tokenizer_folder)
    language = load_model(str(folder), SourceOptions(context_len=64)).language
    model = copy.deepcopy(language.causal_lm)
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert smooth(model, language.tokenizer, 0.5) == 2 * 6
    assert torch.equal(model.get_input_embeddings().weight, embedding)


@pytest.mark.parametrize("architecture", sorted(TINY_LM_CONFIGS))
def test_smoothing_is_exact_in_float_for_every_supported_family(tmp_path: Path, smollm2_tokenizer_folder: Path,
                                                                architecture: str) -> None:
    """Smoothing rescales only where the family's layout makes it exact (Gemma 3's 1 + gamma norms, Phi-2's
    shared LayerNorm with a bias would not be): the logits are the same after it, whatever it rescaled."""
    folder = make_tiny_lm(tmp_path / f"tiny-{architecture}", architecture, smollm2_tokenizer_folder)
    language = load_model(str(folder), SourceOptions(context_len=64)).language
    model = copy.deepcopy(language.causal_lm)
    ids = torch.tensor([language.tokenizer("The lighthouse keeper climbed the stairs.")["input_ids"]])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                parameter.add_(torch.rand_like(parameter))  # not all ones: a wrong fold shows
        before = model(ids).logits
    rescaled = smooth(model, language.tokenizer, 0.5)
    with torch.no_grad():
        after = model(ids).logits
    assert (rescaled > 0) == (architecture in LLAMA_LAYOUT)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_calibration_is_measured_once_per_model_and_smooths_every_copy_alike(tmp_path: Path,
                                                                          smollm2_tokenizer_folder: Path) -> None:
    """The .pte and the .tflite each smooth a copy of the same weights: the calibration pass (11 s for a
    1.2B model) runs once, on the reference, and a copy smoothed with the shared maxima is the copy
    smoothed with its own."""
    folder = make_tiny_lm(tmp_path / "tiny-llama", "llama", smollm2_tokenizer_folder)
    language = load_model(str(folder), SourceOptions(context_len=64)).language
    calls = []
    language.causal_lm.register_forward_pre_hook(lambda module, args, kwargs: calls.append(module), with_kwargs=True)
    shared = language.calibration_maxima()
    assert language.calibration_maxima() is shared
    assert len(calls) > 0
    first_count = len(calls)
    copy_, alone = language.working_copy(), language.working_copy()
    assert smooth(copy_, language.tokenizer, 0.5, maxima=shared) == smooth(alone, language.tokenizer, 0.5)
    assert sum(module is language.causal_lm for module in calls) == first_count  # no second pass on the reference
    for (name, mine), (_, own) in zip(copy_.named_parameters(), alone.named_parameters()):
        assert torch.equal(mine, own), name


def test_column_maxima_taken_in_blocks_of_rows_are_the_whole_weight_s() -> None:
    import torch

    from exporter.smoothing import _column_maxima

    weight = torch.randn(10, 6)
    for rows_at_once in (1, 3, 10, 64):
        assert torch.equal(_column_maxima(weight, rows_at_once), weight.abs().amax(0))
