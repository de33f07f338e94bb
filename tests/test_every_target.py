"""Every shipped target exports every kind of model it accepts: a language model, an encoder and a
vision model from a factory function, each with the target's own thresholds and runtimes."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import known_targets, load_target
from tests.conftest import TESTS, make_trained_tiny_lm

KINDS = ("language", "encoder", "vision")


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
