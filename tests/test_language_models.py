"""Language models end to end: tiny random models of each architecture, bad inputs, and the real default model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from exporter.errors import SourceError
from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.sources.decoder import SUPPORTED
from exporter.targets import load_target, load_target_file
from tests.conftest import (FLOAT_BOTH, TINY_LM_CONFIGS, copy_export, make_tiny_lm, run_cli, smollm2_gguf,
                            write_target)
from tests.family_gguf import ARCHITECTURES, write_family_gguf

# Every format: the .mlpackage is built and its structure checked (its numerics need a Mac).
FLOAT_ALL = FLOAT_BOTH + """
[[artifact]]
format = "mlpackage"
quant = "fp32"
deployment_target = "iOS18"
[artifact.parity]
min_token_agreement = 0.99
"""


# Session-scoped, not module-scoped: writing the tiny folders takes seconds, so each worker writes its own
# and the tests that use them spread over both workers (a module-scoped fixture groups its module's tests
# on one worker: tests/conftest.py).
@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_folder: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {arch: make_tiny_lm(root / f"tiny-{arch}", arch, smollm2_tokenizer_folder) for arch in SUPPORTED}


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gpt2", "phi3", "phi", "mistral", "smollm3",
                                          "gemma3_text", "gpt_neox", "gpt_neo"])
def test_tiny_language_model_exports_to_every_format_and_generates_like_eager(
    tiny_lms: dict[str, Path], tmp_path: Path, architecture: str
) -> None:
    target = load_target_file(write_target(tmp_path, "float", FLOAT_ALL))
    model = load_model(str(tiny_lms[architecture]), SourceOptions(context_len=128))
    summary = export(target, model, tmp_path / "dist")
    assert [r.record["format"] for r in summary.results] == ["pte", "tflite", "mlpackage"]
    for result in summary.results:
        record = result.record
        if record["format"] == "mlpackage":
            assert result.status == "pending-mac", record.get("error")
            continue
        if architecture == "gpt_neo" and record["format"] == "tflite":  # an upstream limit, said so
            assert result.status == "error"
            assert f"litert-torch's LLM exporter does not support {architecture}" in record["error"]
            continue
        assert result.status == "passed", (record["name"], record.get("failures"), record.get("error"))
        assert record["parity"]["metrics"]["greedy_match"] == 1.0



def test_export_starts_litert_beside_the_pte_by_default_and_builds_the_same_artifacts(
    tiny_lms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """litert-torch's child converts while the .pte builds; once it has written its float model and the .pte
    has quantised (let go of) its float copy, the .tflite is quantised and checked beside the .pte's
    lowering, not after it."""
    from exporter import heap
    from exporter.formats import pte, tflite

    events: list[object] = []
    real_launch, real_build, real_finish = tflite._launch, pte.build, tflite._Running.finish
    real_stepper = tflite.lm_stepper
    model = load_model(str(tiny_lms["llama"]), SourceOptions(context_len=128))

    def launch(*args):  # the real ones, noting when each happened
        events.append("litert started")
        return real_launch(*args)

    def build(*args):
        built = real_build(*args)
        deadline = time.monotonic() + 600  # the .tflite's check starts while this build is still going
        while "checking the .tflite" not in events and time.monotonic() < deadline:
            time.sleep(0.2)
        events.append(".pte built")
        return built

    def finish(running):
        parked = all(p.numel() == 0 for p in model.language.causal_lm.parameters())
        # The child converted and wrote its float model, dropped its torch weights, and waits to be told to
        # quantise (its second memory peak), which it is once the .pte's float copy is gone.
        waiting = running.waiting and running.process.poll() is None and (running.work / "model.tflite").is_file()
        events.append(("told to go", "parked" if parked else "in memory", "waiting" if waiting else "not waiting",
                       heap.FLOAT_COPY_RELEASED.is_set()))
        return real_finish(running)

    def stepper(*args):
        events.append("checking the .tflite")
        return real_stepper(*args)

    monkeypatch.setattr(tflite, "_launch", launch)
    monkeypatch.setattr(pte, "build", build)
    monkeypatch.setattr(tflite._Running, "finish", finish)
    monkeypatch.setattr(tflite, "lm_stepper", stepper)
    target = load_target_file(write_target(tmp_path, "float", FLOAT_BOTH))
    summary = export(target, model, tmp_path / "dist")
    assert summary.ok, [(r.record["name"], r.record.get("error")) for r in summary.results]
    assert [r.record["name"] for r in summary.results] == ["xnnpack-fp32", "litert-fp32"]  # the target's order
    assert [r.record["parity"]["metrics"]["greedy_match"] for r in summary.results] == [1.0, 1.0]
    assert events == ["litert started", ("told to go", "parked", "waiting", True), "checking the .tflite",
                      ".pte built"]
    assert all(p.numel() > 0 for p in model.language.causal_lm.parameters())  # back after the build
    assert (summary.folder / "litert-fp32.litertlm").is_file()
    assert not list(summary.folder.glob(".staging-*")) and not tflite._started  # collected, nothing left behind
    again = export(target, model, tmp_path / "dist")  # unchanged: nothing is started ahead
    assert again.ok and len(events) == 4


def test_a_failing_build_stops_the_artifact_checked_beside_it(tiny_lms: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The .pte's build fails (an interrupt, a full disk) while the .tflite is checked beside it: the check
    stops at its next step, litert-torch's child is stopped, and the failure is what the export raises."""
    import threading

    from exporter import heap
    from exporter.formats import pte, tflite

    class Interrupted(Exception):
        pass

    real_stepper = tflite.lm_stepper
    checking = threading.Event()

    def stepper(*args):
        checking.set()
        return real_stepper(*args)

    def build(*args):
        heap.float_copy_released()  # quantised, as far as the .tflite beside it can tell
        assert checking.wait(600), "the .tflite was not checked beside the .pte's build"
        raise Interrupted()

    monkeypatch.setattr(pte, "_build_xnnpack_decoder", lambda *args: build())
    monkeypatch.setattr(tflite, "lm_stepper", stepper)
    model = load_model(str(tiny_lms["llama"]), SourceOptions(context_len=128))
    target = load_target_file(write_target(tmp_path, "float", FLOAT_BOTH))
    with pytest.raises(Interrupted):
        export(target, model, tmp_path / "dist")
    assert not [t for t in threading.enumerate() if t.name.startswith("beside-")]
    assert not tflite._started and not (tmp_path / "dist" / "float" / model.name / "manifest.json").exists()
    assert all(p.numel() > 0 for p in model.language.causal_lm.parameters())


def _memory_gib(pid: int) -> dict[str, float]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in lines if line.startswith(("VmRSS", "VmHWM"))}


def test_litert_child_waits_without_its_float_flatbuffer_in_memory(smollm2_tokenizer_folder: Path, tmp_path: Path) -> None:
    """Converted, litert-torch holds the float flatbuffer as bytes, fp32 weights as big as the model's (4.6 GiB
    for a 1.2B model): the child writes it and lets go of it, and of the torch weights, before it waits
    through the parent's .pte build. A model with a wide embedding table makes that visible."""
    from exporter.formats import tflite

    folder = make_tiny_lm(tmp_path / "wide-llama", "llama", smollm2_tokenizer_folder, hidden_size=2048,
                          intermediate_size=256, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    work = tmp_path / "work"
    work.mkdir()
    child = tflite.start_export_hf(folder, work, None, 16, 64)
    try:
        deadline = time.monotonic() + 600
        while not child.waiting and child.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert child.waiting and child.process.poll() is None, (work / "stderr.txt").read_text()[-2000:]
        flatbuffer = (work / "model.tflite").stat().st_size / 2**30
        waiting = _memory_gib(child.process.pid)
        assert flatbuffer > 0.38  # the embedding table alone, in fp32
        # Its peak held the torch weights, the bytes and the conversion's own copy of the weights, about three
        # flatbuffers beyond what it holds waiting; about two with the bytes kept (measured: 2.9 and 1.9).
        assert waiting["VmHWM"] - waiting["VmRSS"] > 2.5 * flatbuffer, (waiting, flatbuffer)
    finally:
        code, stderr = child.finish()  # go
        assert code == 0, stderr[-2000:]
    assert (work / "model.litertlm").is_file()


def test_sequential_flag_starts_no_litert_export_ahead(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    """--sequential: litert-torch's child starts when its artifact's turn comes, not ahead of the others
    (only the .tflite is built here: without the flag it would still be started ahead)."""
    target = write_target(tmp_path, "float", FLOAT_BOTH)
    result = run_cli("export", "-t", str(target), "-m", str(tiny_lms["llama"]), "--context-len", "128",
                     "-o", str(tmp_path / "dist"), "--sequential", "--only", "tflite")
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout and "litert-fp32.tflite" in result.stdout
    assert "beside the others" not in result.stderr  # the line the concurrent start prints


def test_int8_pte_with_quantised_embedding_reports_every_layer(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    target = load_target_file(write_target(tmp_path, "int8", """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
embedding_quant = "int8"
smoothing = 0.5
[artifact.parity]
min_token_agreement = 0.8
max_mean_kl = 0.1
"""))
    summary = export(target, load_model(str(tiny_lms["llama"]), SourceOptions(context_len=128)), tmp_path / "dist")
    record = summary.results[0].record
    assert summary.ok, record.get("failures")
    layers = {d["layer"]: d for d in record["quantisation"]["layers"]}
    assert layers["model.embed_tokens"]["kind"] == "embedding" and layers["model.embed_tokens"]["quantised"]
    assert layers["lm_head"]["quantised"]
    assert record["quantisation"]["float_layers"] == 0
    assert record["details"]["runner_metadata"]["get_max_context_len"] == 128
    assert "llama.custom_sdpa.default" in record["details"]["non_delegated_ops"]
    assert record["details"]["smoothing"] == {"alpha": 0.5, "rescaled_linears": 2 * 6 + 1}


def test_bundle_is_app_ready(shared_tiny_lm_float: Path) -> None:
    folder = shared_tiny_lm_float
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "golden.npz", "manifest.json",
                 "xnnpack-fp32.pte", "litert-fp32.tflite", "litert-fp32.litertlm"):
        assert (folder / name).is_file(), name
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["context_length"] == 128 and generation["eos_token_ids"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["golden"]["kind"] == "language-model"
    companion = manifest["artifacts"][1]["companions"][0]
    assert companion["file"] == "litert-fp32.litertlm" and len(companion["sha256"]) == 64


def test_a_tflite_recipe_litert_has_no_decoder_for_fails_that_artifact_only(tiny_lms: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """litert-torch's export starts ahead of the others; a recipe it cannot take is that artifact's error,
    not the end of the export."""
    target = load_target_file(write_target(tmp_path, "per-tensor", FLOAT_BOTH.replace(
        'format = "tflite"\nquant = "fp32"', 'format = "tflite"\nquant = "int8-dynamic-tensor"')))
    summary = export(target, load_model(str(tiny_lms["llama"]), SourceOptions(context_len=128)), tmp_path / "dist")
    statuses = {r.spec.format.value: r for r in summary.results}
    assert statuses["pte"].status == "passed"
    assert statuses["tflite"].status == "error"
    assert "litert-torch's LLM exporter has no recipe for int8-dynamic-tensor" in statuses["tflite"].record["error"]


def test_folder_without_tokenizer_is_refused(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_lms["llama"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(SourceError, match="no tokenizer"):
        load_model(str(bare))


def test_a_tokenizer_with_more_tokens_than_the_vocabulary_is_refused(tiny_lms: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """Its ids past the embedding would fail deep inside the eager reference; the load names the mismatch."""
    folder = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_lms["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"the tokenizer has \d+ tokens but the model's vocabulary \(config.json "
                                          r"vocab_size\) has 1000"):
        load_model(str(folder))


def test_context_longer_than_the_model_is_refused(tiny_lms: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match="--context-len 4096 is larger than the model supports \\(256 positions\\)"):
        load_model(str(tiny_lms["llama"]), SourceOptions(context_len=4096))


@pytest.mark.parametrize("architecture", ["gemma3_text", "gpt_neo"])
def test_a_context_longer_than_the_sliding_window_is_refused_and_the_default_fits_it(
        tiny_lms: dict[str, Path], architecture: str) -> None:
    """The program's KV cache attends over the whole context: Gemma 3's sliding layers and GPT-Neo's local
    ones compute the model's own attention only while the context fits their window (128 tokens in the
    tiny models)."""
    with pytest.raises(SourceError, match="--context-len 200 is longer than the model's sliding attention window "
                                          "\\(128 tokens\\).*use --context-len 128 or less"):
        load_model(str(tiny_lms[architecture]), SourceOptions(context_len=200))
    assert load_model(str(tiny_lms[architecture])).language.max_context == 128
    assert load_model(str(tiny_lms["mistral"])).language.max_context == 256  # no window: up to its positions


def test_unsupported_architecture_lists_supported(tmp_path: Path, smollm2_tokenizer_folder: Path) -> None:
    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    shutil.copy(smollm2_tokenizer_folder / "tokenizer.json", folder)
    with pytest.raises(SourceError) as caught:
        load_model(str(folder))
    assert "architecture 'opt' is not supported" in str(caught.value)
    assert "llama (Llama (SmolLM/SmolLM2, TinyLlama))" in str(caught.value)


# What a GGUF cannot say, transformers takes from the family's defaults, which real checkpoints follow:
# Qwen3's head size (128), GPT-2's MLP width (4x) and positions (1024), Gemma 3's layer pattern (5 sliding, 1 global).
GGUF_SHAPES = {"qwen3": {"head_dim": 128}, "gpt2": {"n_inner": None, "n_positions": 1024},
               "gemma3_text": {"layer_types": None}}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_family_gguf_loads_as_the_checkpoint_it_was_written_from(smollm2_tokenizer_folder: Path, tmp_path: Path,
                                                                   architecture: str) -> None:
    """Each family transformers reads from a GGUF, written as llama.cpp's converter writes it: the same
    architecture and the same logits as its HF folder."""
    tokenizer_folder = smollm2_tokenizer_folder
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_tiny_lm(tmp_path / architecture, architecture, tokenizer_folder, **GGUF_SHAPES.get(architecture, {}))
    gguf = write_family_gguf(folder, tmp_path / f"tiny-{architecture}.gguf", smollm2_gguf())
    loaded = load_model(str(gguf), SourceOptions(context_len=128))
    # llama.cpp writes Mistral as "llama" and transformers reads it so (the same computation without a window)
    assert loaded.source["kind"] == "gguf"
    assert loaded.source["architecture"] == ("llama" if architecture == "mistral" else architecture)
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 57, 300, 42, 9, 77, 5]])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded.language.causal_lm(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_litert_reads_a_gpt2_gguf_as_the_checkpoint_it_was_written_from(smollm2_tokenizer_folder: Path,
                                                                        tmp_path: Path) -> None:
    """litert-torch loads a HF folder: a GPT-2 GGUF's is written with its projections back in Conv1D's
    transposed layout (edgeship holds them as nn.Linear) and the num_key_value_heads litert-torch reads."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.formats import tflite

    folder = make_tiny_lm(tmp_path / "gpt2", "gpt2", smollm2_tokenizer_folder, **GGUF_SHAPES["gpt2"])
    model = load_model(str(write_family_gguf(folder, tmp_path / "tiny-gpt2.gguf", smollm2_gguf())),
                       SourceOptions(context_len=128))
    written = tflite._hf_folder(model)
    assert json.loads((written / "config.json").read_text())["num_key_value_heads"] == 4
    reread = AutoModelForCausalLM.from_pretrained(str(written), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 57, 300, 42, 9, 77, 5]])
    with torch.no_grad():
        want, got = model.language.causal_lm(ids).logits, reread(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_gemma3_gguf_exports_and_generates_like_eager(smollm2_tokenizer_folder: Path, tmp_path: Path) -> None:
    folder = make_tiny_lm(tmp_path / "gemma3", "gemma3_text", smollm2_tokenizer_folder, **GGUF_SHAPES["gemma3_text"])
    gguf = write_family_gguf(folder, tmp_path / "tiny-gemma3.gguf", smollm2_gguf())
    target = load_target_file(write_target(tmp_path, "float", FLOAT_BOTH))
    summary = export(target, load_model(str(gguf), SourceOptions(context_len=128)), tmp_path / "dist", only=("pte",))
    assert summary.ok, [(r.record["name"], r.record.get("failures"), r.record.get("error")) for r in summary.results]
    assert summary.results[0].record["parity"]["metrics"]["greedy_match"] == 1.0


def test_a_gguf_of_a_family_transformers_cannot_read_is_refused_with_what_can(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "phi2.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "GGUF architecture 'phi2' is not supported" in message and "gemma3" in message
    assert "export from their HF folder: gpt_neo, gpt_neox, phi, smollm3" in message


def test_truncated_gguf_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf(), "rb") as handle:
        cut.write_bytes(handle.read(5_000_000))
    with pytest.raises(SourceError, match="truncated"):
        load_model(str(cut))


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SourceError, match="not a GGUF file"):
        load_model(str(fake))


@pytest.mark.slow
def test_default_model_exports_for_android_and_answers_through_both_runtimes(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct, no --model: what `make export TARGET=android` does."""
    result = run_cli("export", "--target", "android", "--output", str(tmp_path), "-q", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "android" / "smollm2-135m-instruct-q4_1"
    manifest = json.loads((folder / "manifest.json").read_text())
    pte = manifest["artifacts"][0]
    assert pte["status"] == "passed"
    assert pte["parity"]["metrics"]["token_agreement"] >= 0.9 and pte["parity"]["metrics"]["mean_kl"] <= 0.03
    # "What is the capital of Japan?": the eager model answers it decisively (docs/language-models.md "How faithfulness is measured")
    assert "Tokyo" in pte["text_llm_runner"]["text"]  # ExecuTorch's own TextLLMRunner, unchanged
    # The GGUF's Q4_1 linears carried as 4-bit blocks; the tied embedding/lm_head table stored once, in the
    # .ptd: the pair within 105 MB (the all-int8 pair is 136 MB).
    assert pte["details"]["carried_gguf_blocks"] == 30 * 7
    data = pte["companions"][0]
    assert data["file"] == "xnnpack-q4.ptd" and (folder / data["file"]).is_file()
    assert pte["size"] + data["size"] <= 105e6
    assert "Tokyo" in pte["generations"][0]
    tflite = manifest["artifacts"][1]
    assert tflite["status"] == "passed"
    assert "Tokyo" in tflite["generations"][0]  # greedy answer through the LiteRT interpreter


def test_a_structurally_pruned_language_model_exports_and_generates_like_eager(
        smollm2_tokenizer_folder: Path, tmp_path: Path) -> None:
    """Layers with their own key/value head counts and MLP widths: the .pte's KV cache follows each layer's
    width; litert-torch builds the model from its config, so the .tflite is refused naming why."""
    from tests.pruning import make_pruned_llama

    folder, _ = make_pruned_llama(tmp_path, smollm2_tokenizer_folder)
    target = load_target_file(write_target(tmp_path, "float", FLOAT_ALL))
    summary = export(target, load_model(str(folder), SourceOptions(context_len=128)), tmp_path / "dist")
    pte, tflite, mlpackage = (r.record for r in summary.results)
    assert summary.results[0].status == "passed", (pte.get("error"), pte.get("failures"))
    assert pte["parity"]["metrics"]["greedy_match"] == 1.0 and pte["parity"]["metrics"]["token_agreement"] == 1.0
    assert summary.results[1].status == "error" and "structurally pruned checkpoint has 10 linear layers" in tflite["error"]
    assert summary.results[2].status == "pending-mac", mlpackage.get("error")


def test_bench_times_every_artifact_beside_eager(shared_tiny_lm_float: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.bench import bench, render

    monkeypatch.setenv("EDGESHIP_LITERTLM_PYTHON", str(tmp_path / "no-litert-lm"))  # the next test covers it
    result = bench(copy_export(shared_tiny_lm_float, tmp_path), runs=1)
    rows = {row["engine"]: row for row in result["rows"]}
    # the .pte twice: stepped from Python like the parity check, and in ExecuTorch's own C++ generation loop
    assert set(rows) == {"eager", "xnnpack-fp32", "xnnpack-fp32 (ExecuTorch runner)", "litert-fp32"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert rows["xnnpack-fp32"]["token_agreement"] >= 0.99
    assert "xnnpack-fp32 |" in render(result)


def test_litertlm_bundle_runs_unchanged_in_the_litert_lm_engine(shared_tiny_lm_float: Path, tmp_path: Path) -> None:
    """The .litertlm is loaded and timed by LiteRT-LM's own engine (litert-lm-api, its own venv)."""
    from exporter.bench import bench, litertlm_python

    if litertlm_python() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have LiteRT-LM's environment: make test creates .venv-litertlm")
        pytest.skip("no .venv-litertlm (make test creates it)")
    rows = {row["engine"]: row for row in bench(copy_export(shared_tiny_lm_float, tmp_path), runs=1)["rows"]}
    engine = rows["litert-fp32.litertlm (LiteRT-LM)"]
    assert "error" not in engine, engine
    assert engine["decode_tokens_per_s"] > 0 and engine["prefill_tokens_per_s"] > 0 and engine["load_s"] > 0
    assert engine["token_agreement"] == rows["litert-fp32"]["token_agreement"]  # same weights and graph


@pytest.mark.parametrize("architecture", sorted(TINY_LM_CONFIGS))
def test_stateful_core_ml_decoder_steps_its_cache_like_the_eager_model(tiny_lms: dict[str, Path],
                                                                       architecture: str) -> None:
    """The module converted to Core ML: prompt at once, then token by token with the cache as buffers."""
    import copy

    import torch

    from exporter import llm

    language = load_model(str(tiny_lms[architecture]), SourceOptions(context_len=64)).language
    ids = [5, 17, 99, 3, 42, 7, 250, 8]
    with torch.no_grad():
        eager = language.causal_lm(torch.tensor([ids])).logits[0]
        decoder = llm.StatefulDecoder(copy.deepcopy(language.causal_lm), 64).eval()
        got = [decoder(torch.tensor([ids[:5]]), llm.causal_mask(0, 5))[0]]
        got += [decoder(torch.tensor([[token]]), llm.causal_mask(position, 1))[0] for position, token in
                enumerate(ids[5:], start=5)]
    torch.testing.assert_close(torch.stack(got), eager[4:], atol=1e-4, rtol=1e-4)



def test_a_stateful_program_is_stepped_through_its_causal_mask(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    """The Core ML delegate .pte's calling convention, run here as a plain ExecuTorch program (the delegate
    itself needs Apple hardware): the shared stepper gives the eager model's logits."""
    import copy

    import numpy as np
    import torch
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from device_tests.runner import method_lm_stepper
    from exporter import llm

    language = load_model(str(tiny_lms["llama"]), SourceOptions(context_len=64)).language
    decoder = llm.StatefulDecoder(copy.deepcopy(language.causal_lm), 64).eval()
    path = tmp_path / "stateful.pte"
    path.write_bytes(to_edge_transform_and_lower(llm.export_stateful(decoder, 1)).to_executorch().buffer)
    step = method_lm_stepper(Runtime.get().load_program(str(path)).load_method("forward"))
    ids = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        eager = language.causal_lm(torch.tensor([ids])).logits[0].numpy()
    got = [step(ids[:4], 0)] + [step([token], position) for position, token in enumerate(ids[4:], start=4)]
    np.testing.assert_allclose(np.stack(got), eager[3:], atol=1e-4, rtol=1e-4)


def test_language_model_exports_to_a_stateful_mlpackage_for_ios(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    """Core ML runs only on macOS: here the package is converted and checked, its numerics pend a Mac."""
    import coremltools as ct

    summary = export(load_target("ios"), load_model(str(tiny_lms["qwen2"]), SourceOptions(context_len=64)),
                     tmp_path / "dist")
    result, delegate = summary.results
    record = result.record
    assert result.status == "pending-mac", (record.get("failures"), record.get("error"))
    assert all(c["passed"] for c in record["structural_checks"]), record["structural_checks"]
    assert len(record["details"]["kv_cache_states"]) == 2 * 2  # tiny qwen2 has two layers
    assert record["quantisation"]["float_layers"] == 0 and record["quantisation"]["quantised_layers"] > 0
    spec = ct.utils.load_spec(str(summary.folder / record["file"]))
    assert [i.name for i in spec.description.input] == ["input_ids", "causal_mask"]
    assert spec.specificationVersion >= 9  # iOS 18: the first Core ML with model state
    # the ExecuTorch .pte with the Core ML delegate: the same stateful decoder, one delegate call
    assert delegate.status == "pending-mac", (delegate.record.get("failures"), delegate.record.get("error"))
    assert delegate.record["details"]["delegate_calls"] == 1 and delegate.record["details"]["non_delegated_ops"] == {}
    validated = run_cli("validate", str(summary.folder))  # on Linux: both stay pending a Mac, checks pass
    assert validated.returncode == 0 and validated.stdout.count("pending-mac") == 2, validated.stderr
    too_old = load_target_file(write_target(tmp_path, "ios17-lm", """
[[artifact]]
format = "mlpackage"
quant = "fp16"
deployment_target = "iOS17"
[artifact.parity]
min_token_agreement = 0.9
"""))
    refused = export(too_old, load_model(str(tiny_lms["qwen2"]), SourceOptions(context_len=64)), tmp_path / "dist17")
    assert refused.results[0].status == "error" and "needs deployment_target = \"iOS18\"" in refused.results[0].record["error"]


def test_validate_replays_a_language_model_folder_from_its_golden_file(shared_tiny_lm_float: Path,
                                                                      tmp_path: Path) -> None:
    """`edgeship validate` re-checks an LM export without the model (as on a Mac): golden top-32 and greedy."""
    folder = copy_export(shared_tiny_lm_float, tmp_path)
    done = run_cli("validate", str(folder))
    assert done.returncode == 0, done.stderr
    records = {r["name"]: r for r in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    for name in ("xnnpack-fp32", "litert-fp32"):
        metrics = records[name]["parity"]["metrics"]
        assert metrics["token_agreement"] == 1.0 and metrics["greedy_match"] == 1.0, (name, metrics)
        assert metrics["kl_top32"] < 1e-3 and "mean_kl" not in metrics  # a lower bound is never judged as KL
    (folder / "xnnpack-fp32.pte").write_bytes(b"broken")
    assert run_cli("validate", str(folder)).returncode == 1


TIED = """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
embedding_quant = "{embedding}"
smoothing = 0.5
[artifact.parity]
min_token_agreement = 0.8
max_mean_kl = 0.1
"""


def test_tied_embedding_shares_the_lm_head_table_in_one_data_file(tiny_lms: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_lms["llama"]), SourceOptions(context_len=128))
    records = {}
    for embedding in ("int8", "tied"):
        target = load_target_file(write_target(tmp_path, embedding, TIED.format(embedding=embedding)))
        summary = export(target, model, tmp_path / "dist")
        assert summary.ok, summary.results[0].record.get("failures")
        records[embedding] = summary.results[0].record
    folder = tmp_path / "dist" / "tied" / model.name
    tied = records["tied"]
    vocab, dim = model.language.causal_lm.get_input_embeddings().weight.shape
    assert [c["file"] for c in tied["companions"]] == ["xnnpack-int8-dynamic.ptd"]
    ptd = tied["companions"][0]["size"]
    # The table once (int8 rows + a float scale per row), not twice: the lm_head's rows serve the lookup.
    assert vocab * dim < ptd < 1.1 * (vocab * dim + 4 * vocab)
    saved = records["int8"]["size"] - (tied["size"] + ptd)
    assert saved > 0.95 * vocab * dim, (records["int8"]["size"], tied["size"], ptd)
    layers = {d["layer"]: d for d in tied["quantisation"]["layers"]}
    assert ".ptd" in layers["model.embed_tokens"]["detail"] and "unsmoothed" in layers["model.embed_tokens"]["detail"]
    # ExecuTorch's own runner loads the pair (the .ptd beside the .pte) and generates.
    assert tied["text_llm_runner"].get("generated_tokens") or tied["text_llm_runner"].get("note")
    assert abs(tied["parity"]["metrics"]["token_agreement"] - records["int8"]["parity"]["metrics"]["token_agreement"]) < 0.1
    assert (folder / "xnnpack-int8-dynamic.ptd").is_file() and not list(folder.glob("*.staging*"))
    (folder / "xnnpack-int8-dynamic.ptd").unlink()  # a .pte without its table is no artifact: rebuilt, not reused
    again = export(target, model, tmp_path / "dist")
    assert again.ok and (folder / "xnnpack-int8-dynamic.ptd").is_file()


def test_tied_embedding_falls_back_to_its_own_table_when_the_model_is_not_tied(
    tiny_lms: dict[str, Path], tmp_path: Path
) -> None:
    target = load_target_file(write_target(tmp_path, "tied", TIED.format(embedding="tied")))
    summary = export(target, load_model(str(tiny_lms["phi3"]), SourceOptions(context_len=128)), tmp_path / "dist")
    record = summary.results[0].record
    assert summary.ok, record.get("failures")
    assert record["companions"] == [] and not list(summary.folder.glob("*.ptd"))
    embedding = next(d for d in record["quantisation"]["layers"] if d["kind"] == "embedding")
    assert "not tied to the lm_head" in embedding["detail"] and embedding["quantised"]
