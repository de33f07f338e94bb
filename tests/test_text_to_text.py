"""T5 text-to-text models: one .pte with encode and decode methods, judged by teacher-forced decoder
agreement and greedy generation against transformers' own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import seq2seq
from exporter.errors import SourceError
from exporter.formats import format_module
from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target_file
from tests.conftest import FLOAT_BOTH, run_cli, write_target
from tests.text_to_text import make_tiny_t5, write_t5_gguf

TARGET = """
description = "text-to-text on ExecuTorch"
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
max_mean_kl = 0.001
min_greedy_match = 1.0
[[artifact]]
# android's .pte recipe: with no GGUF blocks to carry, every linear is re-quantised to int8 dynamic
name = "xnnpack-q4"
format = "pte"
quant = "8da4w"
group_size = 32
requantise = "int8-dynamic"
lm_head_quant = "int8-dynamic"
smoothing = 0.5
embedding_quant = "tied"
[artifact.parity]
min_token_agreement = 0.8
max_mean_kl = 0.2
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
max_mean_kl = 0.001
min_greedy_match = 1.0
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
smoothing = 0.5
[artifact.parity]
min_token_agreement = 0.8
max_mean_kl = 0.2
[[artifact]]
format = "pte"
backend = "coreml"
quant = "fp32"
compute_precision = "fp16"
deployment_target = "iOS18"
[artifact.parity]
min_token_agreement = 0.9
[[artifact]]
format = "mlpackage"
quant = "int8-weight"
group_size = 32
compute_precision = "fp16"
deployment_target = "iOS18"
[artifact.parity]
min_token_agreement = 0.8
"""


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_step_modules_compute_what_transformers_computes(tmp_path: Path, feed_forward: str) -> None:
    """Encode once, decode token by token with the cache (in the program, kept by the caller, or Core ML
    state): the
    logits of transformers' whole forward, with padding in the source (Flan-T5's gated GELU and untied head; T5's ReLU and rescaled tied head)."""
    folder = make_tiny_t5(tmp_path / "t5", feed_forward)
    task = load_model(str(folder), SourceOptions(seq_len=16, context_len=12)).seq2seq
    ids, mask = torch.randint(3, 200, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    ids[0, 10:], mask[0, 10:] = 0, 0
    target = torch.randint(3, 200, (1, 12))
    target[0, 0] = task.start_token
    with torch.no_grad():
        want = task.model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits[0].double()
        encode, decode = seq2seq.step_modules(task.model, 12)
        cross = encode(ids, mask)
        got = torch.stack([decode(target[:, p:p + 1], torch.tensor([p]), cross, mask)[0] for p in range(12)]).double()
        stateless = seq2seq.DecodeWithCacheInput(task.model, 12).eval()
        self_kv = torch.zeros(2 * 2, 12, 4, 16)  # the caller's cache: [2 * layers, max_target, heads, d_kv]
        kept = []
        for p in range(12):
            logits, step_kv = stateless(target[:, p:p + 1], torch.tensor([p]), cross, mask, self_kv)
            self_kv[:, p] = step_kv
            kept.append(logits[0])
        kept = torch.stack(kept).double()
        # Core ML's steps as exported (what the .mlpackage and the Core ML .pte hold): the cache is state,
        # the position the decoder mask's length
        core_ml = {name: program.module() for name, (program, _, _) in
                   seq2seq.export_core_ml_steps(task.model, 16, 12).items()}
        cross = core_ml["encode"](ids, mask)
        stateful = torch.stack([core_ml["decode"](target[:, p:p + 1], torch.zeros(1, 1, 1, p + 1), cross, mask)[0]
                                for p in range(12)]).double()
        exact = task.model.double()(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits[0]
    # Peaked random weights give logits in the hundreds: the steps are held to fp32 rounding, measured as
    # transformers' own fp32 forward's distance from its fp64 forward.
    rounding = (want - exact).abs().max()
    assert (got - exact).abs().max() <= 2 * rounding + 1e-4, ((got - exact).abs().max(), rounding)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (kept - exact).abs().max() <= 2 * rounding + 1e-4, ((kept - exact).abs().max(), rounding)
    assert (stateful - exact).abs().max() <= 2 * rounding + 1e-4, ((stateful - exact).abs().max(), rounding)


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("t5")
    folder = make_tiny_t5(root / "flan-t5-tiny")
    target = load_target_file(write_target(root, "text-to-text", TARGET))
    summary = export(target, load_model(str(folder), SourceOptions(seq_len=32, context_len=24)), root / "dist")
    manifest = json.loads((summary.folder / "manifest.json").read_text())
    return {"summary": summary, "manifest": manifest, "by_name": {a["name"]: a for a in manifest["artifacts"]}}


def test_t5_pte_and_tflite_pass_seq2seq_parity_on_their_runtimes(t5_export: dict) -> None:
    for name in ("xnnpack-fp32", "xnnpack-q4", "litert-fp32", "litert-int8-dynamic"):
        record = t5_export["by_name"][name]
        assert record["status"] == "passed", (name, record.get("failures"), record.get("error"))
        metrics = record["parity"]["metrics"]
        assert metrics["eval_tokens"] >= 60 and len(metrics["greedy_by_prompt"]) >= 3
    for name in ("xnnpack-fp32", "litert-fp32"):
        fp32 = t5_export["by_name"][name]["parity"]["metrics"]
        assert fp32["token_agreement"] == 1.0 and fp32["greedy_match"] == 1.0, name


def test_t5_tflite_has_encode_and_decode_signatures_with_the_cache_passed_in(t5_export: dict) -> None:
    record = t5_export["by_name"]["litert-int8-dynamic"]
    inputs = {i["name"]: i["shape"] for i in record["signature"]["inputs"]}
    outputs = {o["name"]: o["shape"] for o in record["signature"]["outputs"]}
    assert inputs["encode.input_ids"] == [1, 32] and inputs["decode.token"] == [1, 1]
    assert inputs["decode.self_kv"] == [4, 24, 4, 16] and outputs["decode.step_kv"] == [4, 4, 16]
    assert outputs["encode.cross_kv"] == [4, 4, 32, 16] and outputs["decode.logits"][0] == 1
    assert record["quantisation"]["float_layers"] == 0 and record["details"]["signatures"] == ["encode", "decode"]
    # the token table, looked up in both signatures, is stored in int8 in each
    tables = [t for t in record["details"]["embedding_lookups"] if t["shape"][0] > 100]
    assert len(tables) == 2 and all(t["int8"] for t in tables), record["details"]["embedding_lookups"]


def test_t5_pte_has_encode_and_decode_methods(t5_export: dict) -> None:
    record = t5_export["by_name"]["xnnpack-q4"]
    inputs = {i["name"]: i["shape"] for i in record["signature"]["inputs"]}
    assert inputs["encode.input_ids"] == [1, 32] and inputs["decode.token"] == [1, 1]
    assert [o["name"] for o in record["signature"]["outputs"]] == ["encode.cross_kv", "decode.logits"]
    # every decoder layer's cross-attention keys and values, computed once by encode: [2 * layers, heads, S, d_kv]
    assert [o["shape"] for o in record["signature"]["outputs"]][0] == [4, 4, 32, 16]
    assert record["quantisation"]["float_layers"] == 0
    details = {d["layer"]: d["detail"] for d in record["quantisation"]["layers"]}
    assert details["lm_head"].startswith("int8") and details["shared"].startswith("int8 groups of 32 (embedding_byte)")
    assert record["details"]["methods"] == ["encode", "decode"]
    assert set(record["details"]["options_not_applied"]) == {"smoothing"}


def test_t5_bundle_carries_the_sentencepiece_tokenizer_and_generation_config(t5_export: dict) -> None:
    folder: Path = t5_export["summary"].folder
    bundle = t5_export["manifest"]["bundle"]
    assert (folder / "spiece.model").is_file() and (folder / "tokenizer.json").is_file()
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 0 and generation["eos_token_ids"] == [1]
    assert generation["source_length"] == 32 and bundle["sentencepiece"] == "spiece.model"


def test_t5_golden_replays_on_the_artifact(t5_export: dict) -> None:
    """What `edgeship validate` does where the model is not at hand: golden.npz alone judges the .pte."""
    from exporter import seq2seq_parity

    folder: Path = t5_export["summary"].folder
    golden = dict(np.load(folder / "golden.npz"))
    stepper = format_module("pte").seq2seq_stepper(folder / "xnnpack-fp32.pte")
    replayed = seq2seq_parity.replay(stepper, golden)
    assert replayed["token_agreement"] == 1.0 and replayed["greedy_match"] == 1.0


def test_t5_mlpackage_is_one_package_with_encode_and_a_stateful_decode(t5_export: dict) -> None:
    """Core ML runs only on a Mac: the package's functions, decode's cache states and compression are
    checked here, and the step the decode function was converted from is exact in eager (above)."""
    record = t5_export["by_name"]["mlprogram-int8-weight"]
    assert record["status"] == "pending-mac", (record.get("error"), record.get("failures"))
    checks = {c["check"]: c for c in record["structural_checks"]}
    assert checks["package holds the encode and decode functions"]["passed"]
    assert checks["decode keeps a key and a value cache per decoder layer as state"]["found"] == [
        "k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    assert all(c["passed"] for c in record["structural_checks"]), record["structural_checks"]
    layers = record["quantisation"]["layers"]
    assert record["quantisation"]["float_layers"] == 0 and len(layers) == len({d["layer"] for d in layers})
    inputs = [i["name"] for i in record["signature"]["inputs"]]
    assert "decode.decoder_mask" in inputs and "encode.input_ids" in inputs


def test_t5_core_ml_pte_delegates_each_method_whole_with_decode_as_the_stateful_step(t5_export: dict) -> None:
    """The ios target's ExecuTorch program: Core ML takes each method in one delegate call (no op left to
    portable kernels), decode is the stateful step checked exact in eager above; its numerics need a Mac."""
    record = t5_export["by_name"]["coreml-fp32"]
    assert record["status"] == "pending-mac", (record.get("error"), record.get("failures"))
    details = record["details"]
    assert details["delegate_calls"] == 2 and details["non_delegated_ops"] == {}, details
    assert details["methods"] == ["encode", "decode"]
    assert details["decode_inputs"] == ["token", "decoder_mask", "cross_kv", "attention_mask"]


def test_an_unsupported_encoder_decoder_is_refused_naming_t5(tmp_path: Path) -> None:
    folder = tmp_path / "bart"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bart", "is_encoder_decoder": True,
                                                    "architectures": ["BartForConditionalGeneration"]}))
    with pytest.raises(SourceError, match="model_type 'bart' is not supported; edgeship exports T5 / Flan-T5"):
        load_model(str(folder))


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_a_t5_gguf_loads_as_its_checkpoint_and_exports(tmp_path: Path, feed_forward: str) -> None:
    """A T5 GGUF as llama.cpp's converter writes it: the same logits and tokens as the checkpoint it was
    written from (Flan-T5's gated GELU, T5 v1.0's ReLU), and its .pte and .tflite pass parity."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    folder = make_tiny_t5(tmp_path / "t5", feed_forward=feed_forward)
    gguf = write_t5_gguf(folder, tmp_path / f"tiny-t5-{feed_forward}.gguf")
    loaded = load_model(str(gguf), SourceOptions(seq_len=32, context_len=16))
    assert loaded.source["kind"] == "gguf" and loaded.source["architecture"] == "t5"
    reference = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    source, target = torch.tensor([[5, 17, 40, 9, 77, 1]]), torch.tensor([[0, 7, 30, 12]])
    with torch.no_grad():
        want = reference(input_ids=source, decoder_input_ids=target).logits
        got = loaded.seq2seq.model(input_ids=source, decoder_input_ids=target).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    texts = ["Summarize: the quick brown fox jumps over the lazy dog.", "fill <extra_id_0> in <extra_id_1>"]
    folder_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert [loaded.seq2seq.tokenizer(t).input_ids for t in texts] == [folder_tokenizer(t).input_ids for t in texts]
    if feed_forward == "relu":
        return  # one export is enough to show a GGUF's model reaches the runtimes
    summary = export(load_target_file(write_target(tmp_path, "float", FLOAT_BOTH)), loaded, tmp_path / "dist")
    manifest = json.loads((summary.folder / "manifest.json").read_text())
    for record in manifest["artifacts"]:
        assert record["status"] == "passed", (record["name"], record.get("failures"), record.get("error"))
        assert record["parity"]["metrics"]["greedy_match"] == 1.0
    assert manifest["model"]["source"]["kind"] == "gguf" and (summary.folder / "tokenizer.json").is_file()


def test_a_t5_encoder_gguf_is_refused_naming_what_is_read(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError, match="architecture 't5encoder' is not supported; edgeship reads GGUFs of .*t5"):
        load_model(str(path))


def test_validate_replays_a_t5_export(t5_export: dict) -> None:
    """`edgeship validate` replays golden.npz through both steps of every artifact that runs here."""
    folder: Path = t5_export["summary"].folder
    validated = run_cli("validate", str(folder))
    assert validated.returncode == 0, validated.stderr[-2000:]
    records = {a["name"]: a for a in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    for name in ("xnnpack-fp32", "litert-fp32"):
        assert records[name]["status"] == "passed" and records[name]["parity"]["metrics"]["greedy_match"] == 1.0


def test_each_method_keeps_only_the_weights_it_reads(tmp_path: Path) -> None:
    """Both steps hold the whole (quantised) T5; each method's program keeps only its own weights, or the
    .pte stores every int8 linear twice."""
    from exporter.formats.pte import quantise
    from exporter.formats.xnnpack_linears import retrace_friendly

    task = load_model(str(make_tiny_t5(tmp_path / "t5")), SourceOptions(seq_len=16, context_len=8)).seq2seq
    spec = load_target_file(write_target(tmp_path, "t", TARGET)).artifacts[1]  # the int8 recipe
    t5, _ = quantise(task.working_copy(), spec)
    retrace_friendly(t5)
    programs = seq2seq.export_methods(*seq2seq.step_modules(t5, 8), 16)

    def weights(method: str) -> set[str]:
        program = programs[method]
        return {name for name in [*program.state_dict, *program.constants] if "cache" not in name}

    encoder_only = {n for n in weights("encode") if ".encoder." in n}
    assert encoder_only and not encoder_only & weights("decode")
    assert any("SelfAttention.q" in n for n in weights("decode") if ".decoder." in n)
    assert not any(".decoder.block.0.layer.0." in n for n in weights("encode"))
