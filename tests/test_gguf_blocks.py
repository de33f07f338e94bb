"""A GGUF's Q4_1 blocks carried into the .pte exactly, instead of re-quantising the dequantised weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter import llm
from exporter.smoothing import smooth
from exporter.sources import SourceOptions, load_model
from exporter.sources.gguf_blocks import Blocks, read_blocks
from tests.conftest import make_tiny_gguf, smollm2_gguf


def _int8_activations_times(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What 8da means: x quantised per token to asymmetric int8, times the weight as it is."""
    low = x.amin(-1, keepdim=True).clamp(max=0)
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 255
    zero = torch.round(-128 - low / scale)
    return ((torch.round(x / scale + zero).clamp(-128, 127) - zero) * scale) @ weight.T


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


def test_every_q4_1_linear_of_the_default_model_is_read_back_exactly() -> None:
    model = load_model(str(smollm2_gguf())).language.causal_lm
    blocks = read_blocks(smollm2_gguf(), model)
    assert len(blocks) == 30 * 7  # q, k, v, o, gate, up, down in 30 layers; the Q8_0 embedding is not Q4_1
    for name, carried in blocks.items():
        assert carried.q.min() >= -8 and carried.q.max() <= 7
        assert torch.equal(carried.dequantised(), model.get_submodule(name).weight), name


def test_carried_linear_is_the_exact_weight_with_int8_activations_in_eager_and_in_the_pte(tmp_path: Path) -> None:
    from executorch.runtime import Runtime

    from exporter.formats.pte import lower
    from exporter.targets import load_target

    torch.manual_seed(0)
    rows, cols = 48, 96
    blocks = Blocks(torch.rand(rows, cols // 32) * 0.01, torch.randn(rows, cols // 32) * 0.02,
                    torch.randint(-8, 8, (rows, cols), dtype=torch.int8))
    layer = llm.CarriedLinear(blocks, bias=torch.randn(rows))
    x = torch.randn(1, 5, cols)
    want = _int8_activations_times(x, blocks.dequantised()) + layer.blocks.bias
    assert torch.allclose(layer(x), want, atol=1e-5)

    spec = next(a for a in load_target("android-q4").artifacts if a.format == "pte")
    details, data_files = lower(torch.export.export(layer, (x,), strict=False), spec, tmp_path / "layer.pte")
    assert details["delegate_calls"] == 1 and details["non_delegated_ops"] == {}  # all three matmuls on XNNPACK
    assert data_files == []
    got = Runtime.get().load_program(str(tmp_path / "layer.pte")).load_method("forward").execute([x])[0]
    # XNNPACK keeps the 4-bit block scales in bfloat16: up to 0.4% per block, nothing more.
    assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())


def test_smoothing_rescales_carried_blocks_with_the_weights(tiny_gguf: Path) -> None:
    language = load_model(str(tiny_gguf), SourceOptions(context_len=64)).language
    model = language.causal_lm
    ids = torch.tensor([language.tokenizer("The capital of France is Paris.")["input_ids"]])
    before = model(ids).logits
    carried = read_blocks(tiny_gguf, model)
    assert len(carried) == 2 * 7
    untouched = {name: b.scale.clone() for name, b in carried.items()}
    smooth(model, language.tokenizer, 0.5, {model.get_submodule(n): b for n, b in carried.items()})
    assert torch.allclose(model(ids).logits, before, rtol=1e-4, atol=1e-4)  # the same function in float
    for name, b in carried.items():
        assert torch.allclose(b.dequantised(), model.get_submodule(name).weight, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(carried["model.layers.0.self_attn.q_proj"].scale, untouched["model.layers.0.self_attn.q_proj"])


def test_column_factors_that_split_a_block_are_refused() -> None:
    blocks = Blocks(torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="constant within each block of 32"):
        blocks.scale_columns(torch.arange(64, dtype=torch.float32))
