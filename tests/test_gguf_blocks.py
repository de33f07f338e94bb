"""A GGUF's Q4_1 blocks carried into the .pte exactly, instead of re-quantising the dequantised weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.smoothing import smooth
from exporter.sources import SourceOptions, load_model
from exporter.sources.gguf_blocks import Blocks, read_blocks
from tests.conftest import make_tiny_gguf, smollm2_gguf


@pytest.fixture(scope="session")  # cheap: not a reason to keep this module's tests on one worker
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


def test_every_q4_1_linear_of_the_default_model_is_read_back_exactly() -> None:
    model = load_model(str(smollm2_gguf())).language.causal_lm
    blocks = read_blocks(smollm2_gguf(), model)
    assert len(blocks) == 30 * 7  # q, k, v, o, gate, up, down in 30 layers; the Q8_0 embedding is not Q4_1
    for name, carried in blocks.items():
        assert carried.q.min() >= -8 and carried.q.max() <= 7
        assert torch.equal(carried.dequantised(), model.get_submodule(name).weight), name


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


def test_offsets_become_int4_digits_of_ever_finer_bf16_scales() -> None:
    from exporter.formats.carried_linears import offset_digits

    torch.manual_seed(0)
    offsets = torch.randn(40, 18) * torch.logspace(-3, 0, 40).unsqueeze(1)
    offsets[3] = 0  # a row without offsets still gets normal positive scales
    integers, scales = offset_digits(offsets, digits=2)
    assert integers.shape == (40, 64) and scales.shape == (40, 2)
    assert integers.min() >= -8 and integers.max() <= 7
    assert not integers[:, 18:32].any() and not integers[:, 50:].any()  # padding to whole groups of 32
    assert torch.equal(scales, scales.to(torch.bfloat16).float()) and bool((scales > 0).all())
    rebuilt = integers[:, :18].float() * scales[:, :1] + integers[:, 32:50].float() * scales[:, 1:]
    error = (rebuilt - offsets).abs().amax(1) / offsets.abs().amax(1).clamp(min=1e-30)
    assert float(error.max()) < 1 / 150  # about 8 bits per offset with two digits
    three = offset_digits(offsets, digits=3)
    assert three[0].shape == (40, 96)


def test_carried_linears_on_one_input_are_one_delegate_close_to_the_exact_weights(tmp_path: Path) -> None:
    from executorch.runtime import Runtime

    from exporter.formats.carried_linears import BlockMeans, CarriedLinear
    from exporter.formats.pte import lower
    from exporter.targets import load_target

    torch.manual_seed(0)
    cols = 96
    members = [Blocks(torch.rand(rows, cols // 32) * 0.01, torch.randn(rows, cols // 32) * 0.02,
                      torch.randint(-8, 8, (rows, cols), dtype=torch.int8)) for rows in (48, 16)]
    biases = [torch.randn(48), None]
    means = BlockMeans(cols, mean_factor=4.0, readers=2)
    linears = [CarriedLinear(b, bias, means, reader) for reader, (b, bias) in enumerate(zip(members, biases))]

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = linears

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.first(x), self.second(x)

    layer = Both()
    assert len(list(layer.named_buffers(remove_duplicate=False))) == len(list(layer.named_buffers()))
    x = torch.randn(1, 5, cols)
    exact = x @ torch.cat([b.dequantised() for b in members]).T + torch.cat([biases[0], torch.zeros(16)])
    eager = torch.cat(layer(x), -1)
    assert eager.shape == (1, 5, 64) and means._input is None  # nothing held once both readers had it
    assert float((eager - exact).abs().max()) < 0.02 * float(exact.abs().max())  # int8 activations, bf16 scales

    spec = next(a for a in load_target("android").artifacts if a.format == "pte")
    dynamic = {0: None, 1: torch.export.Dim("t", min=1, max=64), 2: None}
    program = torch.export.export(layer, (x,), dynamic_shapes=(dynamic,), strict=False)
    assert sum(n.target == torch.ops.aten.cat.default for n in program.graph.nodes) == 1  # means appended once
    details, _ = lower(program, spec, tmp_path / "layer.pte")
    assert details["delegate_calls"] == 1 and details["non_delegated_ops"] == {}  # means, cat, matmuls: one delegate
    method = Runtime.get().load_program(str(tmp_path / "layer.pte")).load_method("forward")
    for tokens in (5, 1):
        got = torch.cat(list(method.execute([x[:, :tokens]])), -1)
        assert float((got - eager[:, :tokens]).abs().max()) < 2e-3 * float(exact.abs().max())


def test_linears_that_read_one_input_share_its_block_means(tiny_gguf: Path) -> None:
    from exporter.formats import carried_linears

    language = load_model(str(tiny_gguf), SourceOptions(context_len=64)).language
    model = language.causal_lm
    ids = torch.tensor([language.tokenizer("The lighthouse keeper climbed the steps every evening.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    carried = read_blocks(tiny_gguf, model)
    report = carried_linears.carry(model, carried, lambda: model(ids))
    assert set(report) == set(carried)
    assert "block means shared with q_proj, v_proj" in report["model.layers.1.self_attn.k_proj"]
    assert "block means shared with gate_proj" in report["model.layers.0.mlp.up_proj"]
    assert "shared" not in report["model.layers.0.mlp.down_proj"]
    means = {id(model.get_submodule(n).means) for n in carried}
    assert len(means) == 2 * 4  # per layer: q/k/v, o, gate/up, down
    # each weight under one name: aliases would make torch.export keep an unused copy in the program
    assert len(list(model.named_buffers(remove_duplicate=False))) == len(list(model.named_buffers()))
    with torch.no_grad():
        after = model(ids).logits
    assert float((after.argmax(-1) == before.argmax(-1)).float().mean()) > 0.9
    assert all(model.get_submodule(n).means._input is None for n in carried)  # nothing held after a step


def test_blocks_are_recovered_from_weights_that_are_a_dequantised_gguf(tiny_gguf: Path) -> None:
    from exporter.sources.gguf_blocks import blocks_in_model, blocks_on_grid

    model = load_model(str(tiny_gguf), SourceOptions(context_len=64)).language.causal_lm
    from_file = read_blocks(tiny_gguf, model)
    from_values = blocks_in_model(model)
    assert set(from_values) == set(from_file)  # the lm_head/embedding (Q8_0) is not on a Q4_1 grid
    for name, blocks in from_file.items():
        found = from_values[name]
        assert torch.equal(found.q, blocks.q) and torch.equal(found.scale, blocks.scale), name
        assert torch.equal(found.offset, blocks.offset), name
    weight = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().clone()
    assert blocks_on_grid(weight) is not None
    weight[3, 40] += 1e-4  # one value off the grid: the whole weight is refused, never approximated
    assert blocks_on_grid(weight) is None
    assert blocks_on_grid(torch.randn(8, 64)) is None  # float weights


def test_a_hf_folder_saved_from_a_q4_1_gguf_gets_the_carried_artifact(tiny_gguf: Path, tmp_path: Path) -> None:
    from exporter.pipeline import export
    from exporter.targets import load_target

    language = load_model(str(tiny_gguf), SourceOptions(context_len=64)).language
    folder = tmp_path / "hf"
    language.causal_lm.save_pretrained(folder)  # fp32, as a user saves a GGUF-loaded model
    language.tokenizer.save_pretrained(folder)
    target = load_target("android")
    summary = export(target, load_model(str(folder), SourceOptions(context_len=64)), tmp_path / "dist", only=("pte",))
    record = summary.results[0].record
    assert record["details"]["carried_gguf_blocks"] == 2 * 7
    carried = [d for d in record["quantisation"]["layers"] if "carried exactly" in d["detail"]]
    assert len(carried) == 2 * 7
