from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import TargetError
from exporter.targets import TARGETS_DIR, Format, known_targets, load_target, load_target_file
from tests.conftest import write_target

FIXTURES = Path(__file__).parent / "fixtures" / "targets"


@pytest.mark.parametrize("path", sorted(TARGETS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_target_loads(path: Path) -> None:
    target = load_target_file(path)
    assert target.name == path.stem
    assert target.description
    assert target.artifacts
    for spec in target.artifacts:
        thresholds = {k: v for k, v in vars(spec.parity).items() if v is not None}
        assert thresholds, f"{spec.name} has no parity thresholds"


# Which thresholds can judge which kind of model (exporter/parity.py): a tensor model always has cosine
# and max error (top-1 only when an output is logits); a language model has token agreement, KL and
# greedy match. A threshold the model lacks is "not applicable", and an artifact with none fails.
TENSOR_THRESHOLDS = {"min_cosine", "max_abs_error"}
LANGUAGE_MODEL_THRESHOLDS = {"min_token_agreement", "max_mean_kl", "min_greedy_match"}


@pytest.mark.parametrize("path", sorted(TARGETS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_artifact_can_judge_every_kind_of_model_it_is_built_for(path: Path) -> None:
    """An artifact is built for both kinds of model unless its `models` says otherwise, and needs a
    threshold for each kind it is built for."""
    for spec in load_target_file(path).artifacts:
        thresholds = {k for k, v in vars(spec.parity).items() if v is not None}
        if spec.builds_for("tensor"):
            assert thresholds & TENSOR_THRESHOLDS, f"{path.name}: {spec.name} cannot judge a tensor model"
        if spec.builds_for("language"):
            assert thresholds & LANGUAGE_MODEL_THRESHOLDS, f"{path.name}: {spec.name} cannot judge a language model"


def test_an_artifact_can_be_built_for_one_kind_of_model_only(tmp_path: Path) -> None:
    body = '[[artifact]]\nformat = "tflite"\nquant = "fp32"\nmodels = [%s]\n[artifact.parity]\nmin_cosine = 0.99\n'
    spec = load_target_file(write_target(tmp_path, "one", body % '"tensor"')).artifacts[0]
    assert spec.builds_for("tensor") and not spec.builds_for("language")
    assert load_target_file(write_target(tmp_path, "both", body.replace("models = [%s]\n", ""))).artifacts[0].models == (
        "tensor", "language")
    for bad, message in (('"text"', "models entry 'text' is not one of tensor, language"),
                         ("", "models must list each kind of model once"),
                         ('"tensor", "tensor"', "models must list each kind of model once"),
                         ("1", "models must list each kind of model once")):
        with pytest.raises(TargetError, match=message):
            load_target_file(write_target(tmp_path, "bad", body % bad))


def test_the_required_targets_ship() -> None:
    assert {"android", "ios", "raspberry-pi", "linux-x86_64"} <= set(known_targets())


def test_android_prefers_xnnpack_pte_then_tflite() -> None:
    formats = [a.format for a in load_target("android").artifacts]
    assert formats == [Format.PTE, Format.TFLITE]


BAD = {
    "typo_key": "artifact 1: unknown key 'qaunt' (did you mean 'quant'?)",
    "unknown_scheme": "quant 'int3-magic' is not one of",
    "scheme_not_for_format": "quant '8da4w' is not available for .mlpackage; use one of",
    "wrong_type": "key 'group_size' must be an integer, got '32'",
    "missing_parity": "artifact 1: missing key 'parity'",
    "parity_typo": "parity: unknown key 'min_cosin' (did you mean 'min_cosine'?)",
    "no_group_size": "quant '8da4w' needs group_size",
    "blockwise_ios17": 'need deployment_target = "iOS18"',
    "option_wrong_format": "key 'deployment_target' is not understood by .tflite",
    "tflite_block_size": "group_size in (32, 64, 128, 256), got 16",
    "unknown_format": "format 'onnx' is not one of pte, mlpackage, tflite",
    "no_artifacts": "no [[artifact]] tables",
    "duplicate_names": "'xnnpack-fp32' appears twice",
    "not_toml": "not valid TOML",
    "smoothing_without_dynamic": "smoothing only helps schemes with int8 dynamic activations, not 'fp32'",
    "smoothing_out_of_range": "must be between 0 and 1, got 1.5",
    "lm_head_quant_on_tflite": "key 'lm_head_quant' is not understood by .tflite",
    "requantise_unknown_scheme": "requantise 'int8-weight' is not one of fp32, int8-dynamic, 8da4w",
    "tied_embedding_on_portable": 'shares the lm_head\'s int8 table inside an XNNPACK program; it needs format = "pte"',
    "embedding_quant_on_tflite": "key 'embedding_quant' is not understood by .tflite (litert); remove it",
    "embedding_quant_on_mlpackage": "key 'embedding_quant' is not understood by .mlpackage (mlprogram); remove it",
    "skip_layers_not_a_regex":
        "artifact 1 (int8-head-float): skip_layers pattern 'layers.(0' is not a regular expression",
    "name_with_path": "artifact 1: name '../x' is not a plain file name",
    "sparse_weights_on_pte": "key 'sparse_weights' is not understood by .pte (xnnpack); remove it",
    "sparse_weights_out_of_range": "must be between 0 and 1 (e.g. 0.5), got 50",
    "sparse_quantised_ios17": "sparse weights that are also quantised ('int8-weight') need deployment_target = \"iOS18\"",
}


@pytest.mark.parametrize("fixture", sorted(BAD))
def test_bad_target_file_names_file_key_and_fix(fixture: str) -> None:
    path = FIXTURES / f"{fixture}.toml"
    with pytest.raises(TargetError) as caught:
        load_target_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert BAD[fixture] in message


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "a..b", ".hidden", "/abs", "with space", ""])
def test_artifact_name_must_be_a_plain_file_stem(name: str, tmp_path: Path) -> None:
    path = write_target(tmp_path, "bad-name", f'''
[[artifact]]
name = {json.dumps(name)}
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.99
''')
    with pytest.raises(TargetError, match=r"name .* is not a plain file name; use letters, digits"):
        load_target_file(path)


def test_every_bad_fixture_has_a_test() -> None:
    assert {p.stem for p in FIXTURES.glob("*.toml")} == set(BAD)


def test_unknown_target_lists_known_and_suggests() -> None:
    with pytest.raises(TargetError) as caught:
        load_target("andriod")
    message = str(caught.value)
    assert "unknown target 'andriod' (did you mean 'android'?)" in message
    for name in ("android", "ios", "raspberry-pi", "linux-x86_64"):
        assert name in message


def test_target_by_path(tmp_path: Path) -> None:
    path = tmp_path / "my-board.toml"
    path.write_text((TARGETS_DIR / "raspberry-pi.toml").read_text())
    target = load_target(str(path))
    assert target.name == "my-board"
    assert target.sha256 == load_target("raspberry-pi").sha256
