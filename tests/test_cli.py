"""The CLI as users run it: one-line errors with the fix, non-zero exits, no tracebacks for their mistakes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MLP, ROOT, TESTS, run_cli, write_target

PTE_ONLY = """
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
"""
FLOAT_TFLITE = """
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_cosine = 0.9999
"""


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_targets_lists_every_target_with_its_artifacts() -> None:
    result = run_cli("targets")
    assert result.returncode == 0
    for name in ("android:", "ios:", "raspberry-pi:", "linux-x86_64:", "xnnpack-int8-dynamic.pte",
                 "mlprogram-int8-weight.mlpackage"):
        assert name in result.stdout
    pi_tflite = next(line for line in result.stdout.splitlines() if "litert-int8-dynamic-tensor.tflite" in line)
    assert pi_tflite.endswith("checked on tflite-runtime-2.14")  # the runtimes its devices run


def test_unknown_target() -> None:
    assert_user_error(run_cli("export", "--target", "andriod", "--model", MLP),
                      "unknown target 'andriod' (did you mean 'android'?)", "known targets: android, android-int8, ios")


def test_missing_model_path(tmp_path: Path) -> None:
    assert_user_error(run_cli("export", "-t", "android", "-m", str(tmp_path / "nope")), "nope: no such file or folder")


def test_factory_that_raises() -> None:
    assert_user_error(run_cli("export", "-t", "android", "-m", f"{TESTS}/models.py:build_raises"),
                      "raised RuntimeError: weights server unreachable")


def test_factory_returning_the_wrong_thing() -> None:
    assert_user_error(run_cli("export", "-t", "android", "-m", f"{TESTS}/models.py:build_model_only"),
                      "must return (model, sample_inputs)")


def test_corrupt_checkpoint(bert_classifier: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-bert"
    shutil.copytree(bert_classifier, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_user_error(run_cli("export", "-t", "android", "-m", str(broken)), "truncated or corrupt")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("config.json", "[1, 2]", "config.json: must hold a JSON object"),
    ("modules.json", '[{"idx": 0, "path": ""', "modules.json: not valid JSON"),
    ("modules.json", '{"0": "Pooling"}', "modules.json: must hold a JSON list"),
    ("1_Pooling/config.json", '{"pooling_mode_mean_tokens": tr', "1_Pooling/config.json: not valid JSON"),
], ids=["config-not-an-object", "modules-truncated", "modules-not-a-list", "pooling-truncated"])
def test_checkpoint_json_that_is_cut_short_or_the_wrong_shape(name: str, text: str, message: str, bert_sentence: Path,
                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken-minilm"
    shutil.copytree(bert_sentence, broken)
    (broken / name).write_text(text)
    assert_user_error(run_cli("export", "-t", "android", "-m", str(broken), "-o", str(tmp_path / "dist")),
                      message, "re-save the checkpoint")
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("export", "-t", "android", "--batch-size", "0"),
     "argument --batch-size: must be a whole number of 1 or more, got 0"),
    (("export", "-t", "android", "--seq-len", "-8"), "argument --seq-len: must be a whole number of 1 or more, got -8"),
    (("export", "-t", "android", "--context-len", "0"), "argument --context-len: must be a whole number of 1 or more"),
    (("export", "-t", "android", "--batch-size", "two"), "argument --batch-size: must be a whole number of 1 or more, "
                                                         "got 'two'"),
    (("device-test", "dist/x", "--iterations", "0"), "argument --iterations: must be a whole number of 1 or more"),
], ids=["batch-size-0", "seq-len-negative", "context-len-0", "batch-size-text", "iterations-0"])
def test_numbers_out_of_range_are_usage_errors(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    # no such model or export: whatever happens, nothing heavy runs
    extra = ("-m", str(tmp_path / "no-model"), "-o", str(tmp_path / "dist")) if args[0] == "export" else ()
    result = run_cli(*args, *extra)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert not (tmp_path / "dist").exists()


def test_bad_target_file_by_path() -> None:
    typo = TESTS / "fixtures" / "targets" / "typo_key.toml"
    assert_user_error(run_cli("export", "-t", str(typo), "-m", MLP), "unknown key 'qaunt' (did you mean 'quant'?)")


def test_op_a_backend_cannot_lower_names_op_and_artifact_and_exits_non_zero(tmp_path: Path) -> None:
    result = run_cli("export", "-t", "linux-x86_64", "-m", f"{TESTS}/custom_op_model.py:build",
                     "-o", str(tmp_path), "-q")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: xnnpack-fp32.pte: ExecuTorch could not lower the model: unsupported op(s) edgeship_test::mystery" \
        in result.stderr
    assert "error: litert-fp32.tflite: litert-torch could not convert the model" in result.stderr
    manifest = json.loads((tmp_path / "linux-x86_64" / "custom-op-model" / "manifest.json").read_text())
    assert {a["status"] for a in manifest["artifacts"]} == {"error"}


def cli_on_tmpfs(where: Path, options: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI writing to a real small filesystem: a tmpfs mounted at ``where`` in a mount namespace
    of the CLI's own (``unshare``; unprivileged users get one through a user namespace), so the mount
    needs no cleanup and no root. Where the kernel allows neither, the test says so; under CI it fails."""
    where.mkdir()
    namespace = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; shift 2; exec "$@"'
    result = subprocess.run([*namespace, "sh", "-c", script, "sh", options, str(where), sys.executable, "-m", "exporter",
                             *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if result.returncode == 97 or "unshare:" in result.stderr:
        message = f"cannot mount a tmpfs in a namespace here: {result.stderr.strip()}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return result


def test_read_only_output(tmp_path: Path) -> None:
    assert_user_error(cli_on_tmpfs(tmp_path / "ro", "ro,size=1m", "export", "-t", "android", "-m", MLP,
                                   "-o", str(tmp_path / "ro" / "dist")),
                      "cannot write here (Read-only file system); choose another --output")


def test_no_space_for_the_output(tmp_path: Path) -> None:
    assert_user_error(cli_on_tmpfs(tmp_path / "small", "size=1m", "export", "-t", "android", "-m",
                                   f"{TESTS}/models.py:build_wide", "-o", str(tmp_path / "small")),
                      "MB free, the export needs about", "free some space")


def test_validate_passes_then_catches_a_changed_artifact(tmp_path: Path) -> None:
    target = write_target(tmp_path, "flt", FLOAT_TFLITE)
    assert run_cli("export", "-t", str(target), "-m", MLP, "-o", str(tmp_path / "dist"), "-q").returncode == 0
    folder = tmp_path / "dist" / "flt" / "mlp"
    result = run_cli("validate", str(folder))
    assert result.returncode == 0, result.stderr
    assert "litert-fp32.tflite" in result.stdout and "passed" in result.stdout
    artifact = folder / "litert-fp32.tflite"
    artifact.write_bytes(artifact.read_bytes()[:-16] + b"\x00" * 16)
    result = run_cli("validate", str(folder))
    assert result.returncode == 1
    assert "error: litert-fp32.tflite: litert-fp32.tflite changed since export (sha256 differs)" in result.stderr


def test_validate_without_manifest(tmp_path: Path) -> None:
    assert_user_error(run_cli("validate", str(tmp_path)), "no manifest.json", "run `edgeship export` first")


def language_model_export(folder: Path, **changes: object) -> Path:
    """A language-model export folder as `edgeship export` leaves it, minus the artifacts and golden.npz."""
    from exporter.manifest import SCHEMA_VERSION

    data = {"schema": SCHEMA_VERSION, "model": {"name": "tiny", "inputs": [], "outputs": ["logits"], "fp32_bytes": 1},
            "golden": {"file": "golden.npz", "kind": "language-model"},
            "artifacts": [{"name": "xnnpack-fp32", "file": "xnnpack-fp32.pte", "format": "pte", "backend": "xnnpack",
                           "status": "passed", "thresholds": {"min_token_agreement": 0.9},
                           "quantisation": {"layers": []}}]}
    data.update(changes)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_validate_language_model_without_golden_tokens(tmp_path: Path) -> None:
    folder = language_model_export(tmp_path / "lm")
    before = (folder / "manifest.json").read_bytes()
    assert_user_error(run_cli("validate", str(folder)), "golden.npz: cannot read the golden tokens", "export again")
    assert (folder / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(("changes", "message"), [
    ({"golden": {"kind": "language-model"}}, "manifest.json: golden has no 'file'"),
    ({"artifacts": [{"name": "x", "file": "x.pte", "backend": "xnnpack", "status": "passed"}]},
     "manifest.json: artifact 1 has no 'format'"),
    ({"model": ["tiny"]}, "manifest.json: model must be a JSON object"),
], ids=["golden-file", "artifact-format", "model-not-an-object"])
def test_validate_names_what_the_manifest_lacks(changes: dict, message: str, tmp_path: Path) -> None:
    folder = language_model_export(tmp_path / "lm", **changes)
    before = (folder / "manifest.json").read_bytes()
    assert_user_error(run_cli("validate", str(folder)), message, "export again")
    assert (folder / "manifest.json").read_bytes() == before


def test_validate_manifest_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[]")
    assert_user_error(run_cli("validate", str(tmp_path)), "manifest.json: not a manifest", "export again")


RUN = {"export": "dist/x", "manifest_sha256": "0" * 64, "target": "raspberry-pi", "model": "m", "devices": ["pi"],
       "runner_version": "2", "settings": {}, "started": "now"}


@pytest.mark.parametrize(("name", "text"), [("run.json", json.dumps(RUN)[:40]),
                                            ("pi.json", '{"device": "pi", "ok": tr'), ("pi.json", '["pi"]')],
                         ids=["run-truncated", "device-truncated", "device-not-an-object"])
def test_report_on_a_cut_short_run_file(name: str, text: str, tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    (tmp_path / "pi.json").write_text(json.dumps({"device": "pi", "ok": False, "reason": "unreachable"}))
    (tmp_path / name).write_text(text)
    assert_user_error(run_cli("report", str(tmp_path)), f"{tmp_path / name}: ", "re-run `edgeship device-test`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pi.json", "run.json"]


def test_bench_without_arguments_or_export_folder(tmp_path: Path) -> None:
    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "exporter.bench", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    for args, message in (((), "the following arguments are required: folder"),
                          ((str(tmp_path), "0"), "argument runs: must be a whole number of 1 or more, got 0")):
        result = bench(*args)  # argparse's own usage errors
        assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr
    assert_user_error(bench(str(tmp_path)), f"{tmp_path}: no manifest.json", "run `edgeship export` first")
    assert list(tmp_path.iterdir()) == []


def test_export_prints_summary_table(tmp_path: Path) -> None:
    target = write_target(tmp_path, "flt", FLOAT_TFLITE)
    result = run_cli("export", "-t", str(target), "-m", MLP, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["artifact", "size", "MB"]
    assert "litert-fp32.tflite" in result.stdout and "passed" in result.stdout
    assert "litert-fp32.tflite: litert, fp32" in result.stderr  # progress with elapsed time


def _edgeship(*args: str, logs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          cwd=Path(TESTS).parent, timeout=900, env={**os.environ, "EDGESHIP_LOGS": str(logs)})


def test_the_toolchains_own_output_goes_to_a_log_unless_verbose(tmp_path: Path) -> None:
    """ExecuTorch's C++ runtime prints cpuinfo lines when XNNPACK loads; a user sees edgeship's lines only."""
    target = write_target(tmp_path, "pte", PTE_ONLY)
    logs = tmp_path / "logs"
    quiet = _edgeship("export", "--target", str(target), "--model", MLP, "--output", str(tmp_path / "dist"), logs=logs)
    assert quiet.returncode == 0, quiet.stderr
    assert all(re.match(r"\[ *\d+\.\ds\] ", line) for line in quiet.stderr.splitlines()), quiet.stderr
    assert "cpuinfo" not in quiet.stdout + quiet.stderr and "xnnpack-fp32.pte  " in quiet.stdout
    assert not list(logs.iterdir())  # a successful command leaves no log behind

    folder = tmp_path / "dist" / "pte" / "mlp"
    verbose = _edgeship("-v", "validate", str(folder), logs=logs)
    assert verbose.returncode == 0 and "cpuinfo" in verbose.stdout + verbose.stderr

    strict = write_target(tmp_path, "strict", PTE_ONLY.replace("min_cosine = 0.9999", "max_abs_error = 0.0"))
    failed = _edgeship("export", "--target", str(strict), "--model", MLP, "--output", str(tmp_path / "built"), logs=logs)
    assert failed.returncode == 1
    (log,) = logs.iterdir()
    assert f"(the toolchain's own messages: {log}; -v shows them as they come)" in failed.stderr
    assert "cpuinfo" in log.read_text() and "cpuinfo" not in failed.stderr
