"""Tiny models export to every format and pass parity on their real runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.formats import format_module
from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target_file
from tests.conftest import MLP, write_target

EVERYTHING = """
description = "every format and scheme edgeship has, for tests"
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_cosine = 0.99999
max_abs_error = 1e-4
[[artifact]]
format = "pte"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.999
[[artifact]]
format = "pte"
quant = "8da4w"
group_size = 32
[artifact.parity]
min_cosine = 0.99
[[artifact]]
name = "xnnpack-carried-recipe"
format = "pte"
quant = "8da4w"
group_size = 32
requantise = "int8-dynamic"
[artifact.parity]
min_cosine = 0.999
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.99999
max_abs_error = 1e-4
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.999
[[artifact]]
format = "tflite"
quant = "int8-weight"
[artifact.parity]
min_cosine = 0.999
[[artifact]]
format = "tflite"
quant = "8da4w"
group_size = 32
[artifact.parity]
min_cosine = 0.99
[[artifact]]
format = "mlpackage"
quant = "int4-weight"
group_size = 32
compute_precision = "fp16"
deployment_target = "iOS18"
[artifact.parity]
min_cosine = 0.99
[[artifact]]
format = "mlpackage"
quant = "int8-weight"
deployment_target = "iOS17"
[artifact.parity]
min_cosine = 0.99
[[artifact]]
format = "pte"
backend = "coreml"
quant = "fp32"
deployment_target = "iOS18"
[artifact.parity]
min_cosine = 0.99
"""


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("formats")
    target = load_target_file(write_target(root, "everything", EVERYTHING))
    summary = export(target, load_model(MLP), root / "dist")
    manifest = json.loads((summary.folder / "manifest.json").read_text())
    return {"summary": summary, "manifest": manifest, "by_name": {a["name"]: a for a in manifest["artifacts"]}}


def test_every_runnable_artifact_passes_parity_on_its_runtime(everything: dict) -> None:
    for record in everything["manifest"]["artifacts"]:
        if record["format"] == "mlpackage" or record["backend"] == "coreml":
            continue
        assert record["status"] == "passed", (record["name"], record.get("failures"), record.get("error"))
        assert record["parity"]["checks"], record["name"]


def test_float_artifacts_match_the_eager_model_closely(everything: dict) -> None:
    for name in ("xnnpack-fp32", "litert-fp32"):
        assert everything["by_name"][name]["parity"]["metrics"]["max_abs_error"] < 1e-4


def test_core_ml_is_pending_a_mac_never_passed(everything: dict) -> None:
    for name in ("mlprogram-int4-weight", "mlprogram-int8-weight", "coreml-fp32"):
        record = everything["by_name"][name]
        assert record["status"] == "pending-mac"
        assert record["parity"]["passed"] is None
        assert all(c["passed"] for c in record["structural_checks"])


@pytest.mark.parametrize("name", ["xnnpack-8da4w", "litert-8da4w", "mlprogram-int4-weight"])
def test_layer_that_does_not_fit_the_group_is_float_with_reason(everything: dict, name: str) -> None:
    layers = {d["layer"]: d for d in everything["by_name"][name]["quantisation"]["layers"]}
    assert layers["odd"]["quantised"] is False
    assert layers["odd"]["detail"] == "input width 10 is not a multiple of group_size 32"
    assert all(layers[n]["quantised"] for n in ("embed", "block.0", "block.2", "head"))


def test_per_channel_schemes_quantise_every_linear(everything: dict) -> None:
    for name in ("xnnpack-int8-dynamic", "litert-int8-dynamic", "litert-int8-weight", "mlprogram-int8-weight"):
        quant = everything["by_name"][name]["quantisation"]
        assert (quant["quantised_layers"], quant["float_layers"]) == (5, 0), name


def test_a_model_without_gguf_blocks_gets_the_requantise_scheme(everything: dict) -> None:
    # android's recipe: 4-bit only where a GGUF's blocks are carried, every other linear requantise's int8
    carried_recipe = everything["by_name"]["xnnpack-carried-recipe"]
    plain_int8 = everything["by_name"]["xnnpack-int8-dynamic"]
    assert carried_recipe["quantisation"]["layers"] == plain_int8["quantisation"]["layers"]
    assert carried_recipe["status"] == "passed"


def test_quantised_artifacts_are_smaller(everything: dict) -> None:
    by_name = everything["by_name"]
    assert by_name["xnnpack-8da4w"]["size"] < by_name["xnnpack-int8-dynamic"]["size"] < by_name["xnnpack-fp32"]["size"]
    assert by_name["litert-8da4w"]["size"] < by_name["litert-int8-dynamic"]["size"] < by_name["litert-fp32"]["size"]


def test_manifest_records_signature_checksum_and_toolchain(everything: dict) -> None:
    manifest = everything["manifest"]
    assert manifest["toolchain"]["executorch"] == "1.5.1"
    assert manifest["golden"]["sets"] == 4
    record = everything["by_name"]["litert-int8-dynamic"]
    assert record["signature"]["inputs"] == [{"name": "input_0", "dtype": "float32", "shape": [4, 64]}]
    assert [o["name"] for o in record["signature"]["outputs"]] == ["output"]
    assert len(record["sha256"]) == 64 and record["size"] > 0


def test_artifacts_name_their_tensors_after_the_model_in_its_order(tmp_path: Path) -> None:
    """An app feeds a .tflite's signature and a Core ML package's features by the model's own names, and
    a .pte's positional method in the model's order, which its manifest describes with those names;
    the classifier's names (tokens, scale -> logits, hidden) are not in alphabetical order."""
    target = load_target_file(write_target(tmp_path, "t", """
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
[[artifact]]
format = "mlpackage"
quant = "fp32"
[artifact.parity]
min_cosine = 0.99
"""))
    summary = export(target, load_model("tests.models:build_classifier"), tmp_path / "dist")
    for result in summary.results:
        signature = result.record["signature"]
        assert [i["name"] for i in signature["inputs"]] == ["tokens", "scale"], result.spec.name
        assert [o["name"] for o in signature["outputs"]] == ["logits", "hidden"], result.spec.name
    folder = summary.folder
    golden = np.load(folder / "golden.npz")
    logits, hidden = format_module("tflite").load(folder / "litert-fp32.tflite")(
        [golden["set1.input.tokens"], golden["set1.input.scale"]])
    assert np.allclose(logits, golden["set1.output.logits"], atol=1e-4)
    assert np.allclose(hidden, golden["set1.output.hidden"], atol=1e-4)
    logits, hidden = format_module("pte").load(folder / "xnnpack-fp32.pte")(
        [golden["set1.input.tokens"], golden["set1.input.scale"]])
    assert np.allclose(logits, golden["set1.output.logits"], atol=1e-4)


def test_golden_outputs_replay_on_the_artifact(everything: dict) -> None:
    folder: Path = everything["summary"].folder
    golden = np.load(folder / "golden.npz")
    run = format_module("pte").load(folder / "xnnpack-fp32.pte")
    out = run([golden["set2.input.input_0"]])[0]
    assert np.allclose(out, golden["set2.output.output"], atol=1e-5)


def test_core_ml_delegate_pte_uses_the_delegate(everything: dict) -> None:
    assert everything["by_name"]["coreml-fp32"]["details"]["delegate_calls"] >= 1


def test_hf_classifier_exports_with_top1(bert_classifier: Path, tmp_path: Path) -> None:
    target = load_target_file(write_target(tmp_path, "t", """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.99
min_top1 = 0.75
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
min_top1 = 1.0
"""))
    summary = export(target, load_model(str(bert_classifier), SourceOptions(seq_len=16)), tmp_path / "dist")
    for result in summary.results:
        assert result.status == "passed", result.record.get("failures")
        assert result.record["parity"]["metrics"]["top1"] >= 0.75


def test_core_ml_stores_a_pruned_weight_sparse_when_the_target_asks(tmp_path: Path) -> None:
    """sparse_weights keeps only the nonzero entries (and a mask) of a weight that is at least that sparse,
    alone or under the int8 block-wise weights; a dense weight is left as the scheme makes it."""
    target = load_target_file(write_target(tmp_path, "t", """
[[artifact]]
name = "dense"
format = "mlpackage"
quant = "fp16"
[artifact.parity]
min_cosine = 0.99
[[artifact]]
name = "sparse"
format = "mlpackage"
quant = "fp16"
sparse_weights = 0.4
[artifact.parity]
min_cosine = 0.99
[[artifact]]
name = "sparse-int8"
format = "mlpackage"
quant = "int8-weight"
group_size = 32
deployment_target = "iOS18"
sparse_weights = 0.4
[artifact.parity]
min_cosine = 0.99
"""))
    summary = export(target, load_model("tests.models:build_sparse_mlp"), tmp_path / "dist")
    records = {r.spec.name: r.record for r in summary.results}
    for name, record in records.items():
        assert record["status"] == "pending-mac", (name, record.get("error"))
        assert all(c["passed"] for c in record["structural_checks"]), (name, record["structural_checks"])
    layers = {name: {d["layer"]: d for d in record["quantisation"]["layers"]} for name, record in records.items()}
    assert [n for n, d in layers["sparse"].items() if d.get("stored_sparse")] == ["block.0"]
    assert not any(d.get("stored_sparse") for d in layers["dense"].values())
    assert [n for n, d in layers["sparse-int8"].items() if d.get("stored_sparse")] == ["block.0"]
    assert layers["sparse-int8"]["block.0"]["quantised"] and layers["sparse-int8"]["head"]["quantised"]
    assert "sparse" in layers["sparse-int8"]["block.0"]["detail"]
    assert "stores exactly the reported weights sparse" in str(records["sparse"]["structural_checks"])

    def weight_bytes(name: str) -> int:
        return (summary.folder / f"{name}.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size

    # block.0 (half of the MLP's weights) keeps half its fp16 values and a one-bit mask
    assert weight_bytes("sparse") < 0.85 * weight_bytes("dense")
