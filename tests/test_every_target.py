"""Every shipped target exports every kind of model it accepts: a language model, an encoder and a
vision model from a factory function, each with the target's own thresholds and runtimes; and every
encoder family with a head to every format."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import known_targets, load_target, load_target_file
from tests.conftest import TESTS, make_trained_tiny_lm, write_target
from tests.encoder_families import ENCODER_CONFIGS, HEADS, make_tiny_encoder

KINDS = ("language", "encoder", "vision")
HEADED = [head for head in HEADS if head != "features"]
# The shipped targets' encoder recipes in one export: android's int8 .pte and .tflite, the iPhone's .mlpackage.
EVERY_FORMAT = """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.99
min_top1 = 0.9
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.99
min_top1 = 0.9
[[artifact]]
format = "mlpackage"
quant = "int8-weight"
group_size = 32
compute_precision = "fp16"
deployment_target = "iOS18"
[artifact.parity]
min_cosine = 0.99
min_top1 = 0.9
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_folder: Path,
            bert_sentence: Path) -> dict[str, tuple[str, SourceOptions]]:
    root = tmp_path_factory.mktemp("every-target")
    return {
        "language": (str(make_trained_tiny_lm(root / "tiny-llama", smollm2_tokenizer_folder)),
                     SourceOptions(context_len=128)),
        "encoder": (str(bert_sentence), SourceOptions(seq_len=16)),
        "vision": (f"{TESTS}/models.py:build_depthwise_cnn", SourceOptions()),
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output root for every target, so an artifact two targets share is built once and copied."""
    return tmp_path_factory.mktemp("dist")


@pytest.mark.parametrize("target_name", known_targets())
@pytest.mark.parametrize("kind", KINDS)
def test_every_target_exports_every_kind_of_model(sources: dict, dist: Path, kind: str, target_name: str) -> None:
    source, options = sources[kind]
    target = load_target(target_name)
    model = load_model(source, options)
    summary = export(target, model, dist)
    expected = [s.name for s in target.artifacts if s.builds_for(model.kind)]
    assert [r.spec.name for r in summary.results] == expected
    for result in summary.results:
        record = result.record
        assert result.ok, (target_name, record["name"], record.get("error"), record.get("failures"))
        if kind == "language" and record["format"] == "tflite" and record["quantisation"]["scheme"] != "fp32":
            # Every signature's ops are read: the prefill one leaves out the last layer's MLP and the lm_head
            float_layers = [d["layer"] for d in record["quantisation"]["layers"] if not d["quantised"]]
            assert float_layers == [], (target_name, float_layers)


@pytest.mark.parametrize("family", list(ENCODER_CONFIGS))
def test_every_encoder_family_exports_with_a_head_to_every_format(tmp_path: Path, family: str) -> None:
    """Each family wears another head (tests/test_sources.py loads every family with every head against eager)."""
    head = HEADED[list(ENCODER_CONFIGS).index(family) % len(HEADED)]
    folder = make_tiny_encoder(tmp_path / f"{family}-{head}", family, head)
    target = load_target_file(write_target(tmp_path, "every-format", EVERY_FORMAT))
    model = load_model(str(folder), SourceOptions(seq_len=16))
    summary = export(target, model, tmp_path / "dist")
    assert {r.spec.format.value for r in summary.results} == {"pte", "tflite", "mlpackage"}
    for result in summary.results:
        record = result.record
        if (family, head, result.spec.format.value) == ("mobilebert", "masked-lm", "pte"):
            # MobileBERT's masked-LM head multiplies by its decoder's and dense layer's weight matrices
            # instead of calling them: torchao's int8 weight only serves a call, so those two stay float.
            kept = {d["layer"] for d in record["quantisation"]["layers"] if not d["quantised"]}
            assert kept == {"encoder.cls.predictions.decoder", "encoder.cls.predictions.dense"}, kept
            assert all("read directly" in d["detail"] for d in record["quantisation"]["layers"] if not d["quantised"])
        assert result.ok, (family, head, record["name"], record.get("error"), record.get("failures"))
        if (family, result.spec.format.value) == ("albert", "tflite"):
            # ALBERT's one layer is read by every position of the stack: each of those ops reads the same
            # int8 weight (an op left out of the recipe would keep a float copy of it).
            from exporter.formats.tflite import quantised_scopes

            ops = record["details"]["fully_connected_ops"]
            assert ops > 4 * 6 and len(quantised_scopes(summary.folder / record["file"])) == ops
        if result.status == "passed":
            assert record["parity"]["metrics"]["top1"] >= 0.9, (record["name"], record["parity"]["metrics"])


def test_a_structurally_pruned_encoder_exports_to_every_format(tmp_path: Path) -> None:
    """Layers of different widths (heads and MLP neurons pruned per layer) through the shipped recipes."""
    from tests.pruning import make_pruned_bert

    folder, _ = make_pruned_bert(tmp_path)
    target = load_target_file(write_target(tmp_path, "every-format", EVERY_FORMAT))
    summary = export(target, load_model(str(folder), SourceOptions(seq_len=16)), tmp_path / "dist")
    assert [r.status for r in summary.results] == ["passed", "passed", "pending-mac"], \
        [(r.record["name"], r.record.get("error"), r.record.get("failures")) for r in summary.results]
    pte = summary.results[0].record
    widths = {d["layer"]: d["shape"] for d in pte["quantisation"]["layers"]}
    assert widths["encoder.bert.encoder.layer.0.intermediate.dense"] == [40, 32]
    assert widths["encoder.bert.encoder.layer.1.intermediate.dense"] == [24, 32]
