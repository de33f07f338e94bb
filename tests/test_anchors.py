"""exporter/anchors.py: optimum-executorch's .pte of the same model as a bench row (`make bench ANCHORS=1`).

The fast tests need no optimum install: a tiny ExecuTorch program with optimum's calling convention
(forward(input_ids [1, n], cache_position [n]) -> logits, a KV-cache-like buffer) is built with the main
environment's ExecuTorch, and a fake optimum-cli stands in for the real one where only the caching and the
command line are under test. The real anchor export (about 6 minutes of both cores) runs only with
EDGESHIP_ANCHOR_TESTS=1.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import anchors, files, lm_parity
from tests.conftest import ROOT, copy_export, make_tiny_gguf, make_tiny_lm, run_cli

VOCAB, DIM, MAX_SEQ = 40, 16, 64


class TinyCachedLM(torch.nn.Module):
    """Optimum's convention in miniature: each token's state goes into a cache buffer at its cache_position,
    and each token's logits read the cache up to its own position (a causal mean instead of attention)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.position = torch.nn.Embedding(MAX_SEQ, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        with torch.no_grad():
            self.head.weight.mul_(8)  # peaked next-token distributions, as in a trained model
        self.register_buffer("cache", torch.zeros(1, MAX_SEQ, DIM))

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        state = self.embed(input_ids) + self.position(cache_position).unsqueeze(0)
        self.cache.index_copy_(1, cache_position, state)
        seen = (torch.arange(MAX_SEQ).unsqueeze(0) <= cache_position.unsqueeze(1)).float()  # [n, MAX_SEQ]
        context = seen @ self.cache[0] / seen.sum(-1, keepdim=True)
        return self.head(torch.tanh(context)).unsqueeze(0)  # [1, n, vocab]


def lower_tiny(path: Path, *, dynamic: bool) -> Path:
    """The tiny model as a .pte, with a dynamic length shared by both inputs (optimum's default) or one
    token at a time (optimum's --disable_dynamic_shapes)."""
    from executorch.exir import to_edge_transform_and_lower

    module = TinyCachedLM().eval().requires_grad_(False)
    if dynamic:
        seq = torch.export.Dim("seq_length_dim", max=MAX_SEQ - 1)
        sample = (torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
        shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
        program = torch.export.export(module, sample, dynamic_shapes=shapes)
    else:
        program = torch.export.export(module, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])))
    path.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    return path


def tiny_reference() -> lm_parity.Reference:
    """The eager model's logits for every next token of two texts, each from position 0, and its greedy answers."""
    rng = np.random.default_rng(1)
    texts = {kind: [int(t) for t in rng.integers(0, VOCAB, 30)] for kind in ("prose", "code")}
    logits = {}
    with torch.no_grad():
        for kind, ids in texts.items():
            logits[kind] = TinyCachedLM()(torch.tensor([ids]), torch.arange(len(ids)))[0, :-1].numpy()
    prompts = [[int(t) for t in rng.integers(0, VOCAB, n)] for n in (5, 9)]
    greedy = [lm_parity.greedy(eager_stepper(), p, 12, []) for p in prompts]
    return lm_parity.Reference(texts, logits, prompts, greedy)


def eager_stepper() -> lm_parity.LMStepper:
    model = TinyCachedLM().eval()

    def step(tokens: list[int], start_pos: int) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.tensor([tokens]), torch.arange(start_pos, start_pos + len(tokens)))
        return out[0, -1].double().numpy()

    return step


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-length", "one-token-at-a-time"])
def test_anchor_stepper_measures_a_program_with_optimums_calling_convention(tmp_path: Path, dynamic: bool) -> None:
    program = lower_tiny(tmp_path / "model.pte", dynamic=dynamic)
    step = anchors.load_stepper(program)
    prompt = [3, 1, 4, 1, 5, 9]
    want = eager_stepper()(prompt, 0)
    np.testing.assert_allclose(step(prompt, 0), want, rtol=1e-4, atol=1e-4)  # a prompt at once: one position each

    metrics = lm_parity.measure(step, tiny_reference(), eos_ids=[])
    assert metrics["token_agreement"] == 1.0
    assert metrics["mean_kl"] < 1e-6
    assert metrics["greedy_match"] == 1.0
    assert set(metrics["by_kind"]) == {"prose", "code"}
    assert metrics["eval_tokens"] == 58


def fake_optimum_python(folder: Path, calls: Path, *, fail: bool = False) -> Path:
    """A stand-in for .venv-optimum's python running optimum-cli (the real one installs in its own
    environment): records its command line, writes a program and a data file into --output_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python"
    script.write_text(f"""#!{sys.executable}
import sys
from pathlib import Path
with open({str(calls)!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if {fail!r}:
    print("optimum-cli: something went wrong", file=sys.stderr)
    sys.exit(3)
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
out.mkdir(parents=True)
(out / "model.pte").write_bytes(b"program")
(out / "_default_external_constant.ptd").write_bytes(b"data")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_fake_optimum_cli_builds_the_anchor_once_per_model_and_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from exporter.sources import SourceOptions, load_model

    # a GGUF, as the default model: transformers keeps its quantiser on the dequantised model
    model = load_model(str(make_tiny_gguf(tmp_path / "tiny.gguf")), SourceOptions(context_len=64))
    folder = tmp_path / "export"
    folder.mkdir()
    files.write_json(folder / "manifest.json", {"schema": 1, "model": {"fingerprint": "abc", "fp32_bytes": 1000}})
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("EDGESHIP_OPTIMUM_PYTHON", str(fake_optimum_python(tmp_path / "venv", calls)))

    anchor = anchors.export_anchor(folder, model.language)
    assert anchor.program == folder / "anchors" / "optimum-executorch" / "model.pte"
    assert anchor.data == anchor.program.with_suffix(".ptd")  # renamed: found by the program's stem
    assert anchor.size_bytes == len(b"program") + len(b"data")
    command = calls.read_text().split()
    assert command[:3] == ["-m", "optimum.commands.optimum_cli", "export"]
    assert command[command.index("--model") + 1] == str(folder / "anchors" / "hf")
    assert " ".join(anchors.RECIPE) in " ".join(command)
    saved = AutoModelForCausalLM.from_pretrained(str(folder / "anchors" / "hf")).eval()  # what optimum-cli reads
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, model.language.causal_lm(ids).logits)
    assert not list((folder / "anchors").glob(".staging-*"))

    assert anchors.export_anchor(folder, model.language) == anchor  # unchanged: reused, not rebuilt
    assert len(calls.read_text().splitlines()) == 1

    monkeypatch.setattr(anchors, "RECIPE", (*anchors.RECIPE[:-1], "4w"))  # another recipe: built again
    anchors.export_anchor(folder, model.language)
    assert len(calls.read_text().splitlines()) == 2
    assert json.loads((folder / "anchors" / "optimum-executorch" / "key.json").read_text())["recipe"][-1] == "4w"


def test_a_failed_optimum_cli_is_an_error_with_its_output(
        tmp_path: Path, smollm2_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.errors import ConversionError
    from exporter.sources import SourceOptions, load_model

    model = load_model(str(make_tiny_lm(tmp_path / "tiny-llama", "llama", smollm2_tokenizer_folder)),
                       SourceOptions(context_len=64))
    folder = tmp_path / "export"
    folder.mkdir()
    files.write_json(folder / "manifest.json", {"schema": 1, "model": {"fingerprint": "abc", "fp32_bytes": 1000}})
    monkeypatch.setenv("EDGESHIP_OPTIMUM_PYTHON", str(fake_optimum_python(tmp_path / "venv", tmp_path / "calls",
                                                                          fail=True)))
    with pytest.raises(ConversionError, match="exited 3(.|\n)*something went wrong"):
        anchors.export_anchor(folder, model.language)
    assert not (folder / "anchors" / "optimum-executorch").exists()  # nothing that looks whole


def test_make_bench_needs_the_optimum_environment_only_with_anchors(tmp_path: Path) -> None:
    venv = tmp_path / "optimum-venv"

    def dry_run(*extra: str) -> str:  # -n -B: every recipe the target would run, none of them run
        done = subprocess.run(["make", "-n", "-B", "bench", f"OPTIMUM_VENV={venv}", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert str(venv) not in dry_run()
    assert str(venv) not in dry_run("ANCHORS=")
    with_anchors = dry_run("ANCHORS=1")
    assert f"{venv}/bin/pip install" in with_anchors and "optimum-executorch==1.1.0" in with_anchors
    assert f"EDGESHIP_OPTIMUM_PYTHON={venv}/bin/python" in with_anchors and "--anchors" in with_anchors


def test_bench_without_anchors_never_touches_the_optimum_environment(tmp_path: Path, shared_tiny_lm_pte: Path) -> None:
    folder = copy_export(shared_tiny_lm_pte, tmp_path)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "EDGESHIP_OPTIMUM_PYTHON": str(fake_optimum_python(tmp_path / "venv", calls))}

    def bench(*extra: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "exporter.bench", str(folder), "1", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return {row["engine"]: row for row in json.loads((tmp_path / "bench" / "tiny-llama.json").read_text())["rows"]}

    rows = bench()
    assert not calls.exists() and not (folder / "anchors").exists()
    assert anchors.LABEL not in rows and rows["eager"]["runs"] == 1

    rows = bench("--anchors")  # the same fake is used once asked for: the check above is not vacuous
    assert "--use_custom_sdpa" in calls.read_text()
    assert "error" in rows[anchors.LABEL] and rows["eager"]["runs"] == 1  # the others are still timed


@pytest.mark.slow
@pytest.mark.anchors  # about 6 minutes of both cores: run with EDGESHIP_ANCHOR_TESTS=1 (tests/conftest.py)
def test_bench_with_anchors_on_the_default_model(tmp_path: Path) -> None:
    """What `make bench ANCHORS=1` runs, on the default model, with the bench table written under tmp_path."""
    subprocess.run(["make", ".venv-optimum/.edgeship-installed"], cwd=ROOT, check=True, timeout=1800)
    export = run_cli("export", "--target", "android", "--output", str(tmp_path / "dist"), "--only", "pte", "-q",
                     timeout=3600)
    assert export.returncode in (0, 1), export.stderr[-2000:]
    folder = Path(export.stdout.strip().splitlines()[-1]).parent
    env = {**os.environ, "EDGESHIP_OPTIMUM_PYTHON": str(ROOT / ".venv-optimum" / "bin" / "python")}
    done = subprocess.run([sys.executable, "-m", "exporter.bench", str(folder), "1", "--anchors"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / f"{folder.name}.json").read_text())
    rows = {row["engine"]: row for row in result["rows"]}
    anchor = rows[anchors.LABEL]
    assert "error" not in anchor and anchor["runs"] == 1
    assert 50 < anchor["size_mb"] < 200 and anchor["decode_tokens_per_s"] > 0 and anchor["prefill_tokens_per_s"] > 0
    assert 0.3 < anchor["token_agreement"] < 1.0 and anchor["mean_kl"] > 0
    assert set(anchor["by_kind"]) == set(lm_parity.EVAL_KINDS)
    assert any(name.endswith("(ExecuTorch runner)") for name in rows)  # edgeship's .pte in the same rounds
    assert (folder / "anchors" / "optimum-executorch" / "key.json").is_file()
