"""The emulated arm64 board: Debian's arm64 CPython under qemu-user with the aarch64 wheels of a board's
runtime, served over a real loopback sshd and driven by the harness like any board. What runs there is
ARM's code path (the runtimes' aarch64 builds and their NEON kernels), which no x86 test reaches."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from device_tests import arm64_board
from device_tests.harness import Settings, run_devices
from device_tests.inventory import DeviceSpec, load_inventory
from device_tests.loopback import keygen, make_board
from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target, load_target_file
from tests.conftest import make_trained_tiny_gguf, needs_sshd, write_target

pytestmark = needs_sshd

CNN = f"{Path(__file__).parent}/models.py:build_depthwise_cnn"
PER_CHANNEL = """
description = "the int8 dynamic-range .tflite with per-channel weights, checked on the host's LiteRT only"
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
[artifact.parity]
min_cosine = 0.99
"""


@pytest.fixture(scope="module")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("arm64")
    keygen(root / "client_key")
    folder = arm64_board.default_folder()  # built once on this machine, reused by every later run
    boards = {runtime: make_board(root, f"arm64-{runtime}", str(arm64_board.build(folder, runtime)), root / "client_key")
              for runtime in arm64_board.RUNTIMES}
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(b.known_hosts_line() for b in boards.values()))
    yield {"root": root, "boards": boards, "settings": Settings(iterations=3, warmup=0, known_hosts=known_hosts)}
    for board in boards.values():
        board.stop()


def device(arm64: dict, runtime: str) -> DeviceSpec:
    board = arm64["boards"][runtime]
    return DeviceSpec(name=board.name, transport="ssh", host="127.0.0.1", port=board.port, user=getpass.getuser(),
                      key=str(arm64["root"] / "client_key"), python=board.python, timeout=300, emulated=True,
                      workdir=str(arm64["root"] / "work" / board.name))


def run(arm64: dict, folder: Path) -> dict:
    run_folder, outcomes = run_devices([device(arm64, r) for r in arm64_board.RUNTIMES], folder,
                                       arm64["root"] / "results", arm64["settings"])
    return {"folder": run_folder, **{o.device: o for o in outcomes}}


def test_raspberry_pi_artifacts_pass_on_arm64_with_their_runtimes(arm64: dict) -> None:
    summary = export(load_target("raspberry-pi"), load_model(CNN), arm64["root"] / "dist")
    assert summary.ok
    outcomes = run(arm64, summary.folder)
    host = next(r.record for r in summary.results if r.spec.format.value == "tflite")
    for runtime, version in (("tflite-runtime-2.14", {"tflite_runtime": "2.14.0"}),
                             ("ai-edge-litert-2.3", {"ai_edge_litert": "2.3.0"})):
        outcome = outcomes[f"arm64-{runtime}"]
        assert outcome.ok, outcome.reason
        assert outcome.result["facts"]["arch"] == "aarch64" and outcome.result["facts"]["runtimes"] == version
        measured = outcome.result["artifacts"][host["name"]]  # the .pte needs ExecuTorch: not on these boards
        assert set(outcome.result["artifacts"]) == {host["name"]}
        assert measured["metrics"]["cosine"] > 0.9999 and measured["passed"]
    pte = next(r.record for r in summary.results if r.spec.format.value == "pte")
    on_executorch = outcomes["arm64-executorch-1.5"]
    assert on_executorch.ok and set(on_executorch.result["artifacts"]) == {pte["name"]}  # XNNPACK's arm64 kernels
    assert on_executorch.result["artifacts"][pte["name"]]["metrics"]["cosine"] > 0.999
    report = (outcomes["folder"] / "report.md").read_text()
    assert "| arm64-tflite-runtime-2.14 (emulated) |" in report and "their timings are the emulator's" in report
    summary_json = json.loads((outcomes["folder"] / "summary.json").read_text())
    assert summary_json["devices"]["arm64-ai-edge-litert-2.3"]["emulated"] is True


def test_android_tflite_passes_on_arm64_litert(arm64: dict) -> None:
    """android's .tflite (per-channel int8 dynamic range) on the runtime its apps bundle, LiteRT 2.x, on arm64."""
    from tests.conftest import MLP

    summary = export(load_target("android"), load_model(MLP), arm64["root"] / "android-dist", only=("tflite",))
    assert summary.ok
    run_folder, outcomes = run_devices([device(arm64, "ai-edge-litert-2.3")], summary.folder, arm64["root"] / "results",
                                       arm64["settings"])
    measured = outcomes[0].result["artifacts"]["litert-int8-dynamic"]
    assert outcomes[0].ok and measured["metrics"]["cosine"] > 0.999


def test_per_channel_dynamic_range_fails_on_arm64_tflite_runtime_2_14_as_on_x86(arm64: dict) -> None:
    """The fault is the runtime version, not the CPU: LiteRT 2.3 computes it right on arm64 too."""
    target = load_target_file(write_target(arm64["root"], "per-channel", PER_CHANNEL))
    summary = export(target, load_model(CNN), arm64["root"] / "dist")
    outcomes = run(arm64, summary.folder)
    old = outcomes["arm64-tflite-runtime-2.14"].result["artifacts"]["litert-int8-dynamic"]
    assert old["metrics"]["cosine"] < 0.9 and not old["passed"]
    assert outcomes["arm64-ai-edge-litert-2.3"].result["artifacts"]["litert-int8-dynamic"]["metrics"]["cosine"] > 0.9999


@pytest.mark.parametrize("target_name", ["android", "android-int8"])
def test_android_artifacts_of_a_language_model_pass_on_arm64(arm64: dict, target_name: str,
                                                             smollm2_tokenizer_folder: Path) -> None:
    """The artifacts android and android-int8 build for a GGUF language model, on their runtimes' aarch64
    builds: android's .pte carries the Q4_1 linears as 4-bit blocks (XNNPACK's arm64 4-bit kernels, which no
    x86 test reaches), android-int8's is int8 throughout, both with the tied table in a .ptd; the .tflite runs
    on LiteRT 2.3. Each passes the target's own thresholds there, with the host's agreement."""
    gguf = arm64["root"] / "trained-llama.Q4_1.gguf"
    if not gguf.exists():
        make_trained_tiny_gguf(gguf, smollm2_tokenizer_folder)
    # android-int8's .tflite is android's recipe (int8 dynamic on LiteRT): run once, with android's
    boards = {"pte": "executorch-1.5", "tflite": "ai-edge-litert-2.3"} if target_name == "android" else {
        "pte": "executorch-1.5"}
    summary = export(load_target(target_name), load_model(str(gguf), SourceOptions(context_len=128)),
                     arm64["root"] / f"{target_name}-dist", only=tuple(boards))
    assert summary.ok
    run_folder, outcomes = run_devices([device(arm64, runtime) for runtime in boards.values()], summary.folder,
                                       arm64["root"] / "results", arm64["settings"])
    by_board = {o.device: o for o in outcomes}
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes]
    assert by_board["arm64-executorch-1.5"].result["facts"]["runtimes"] == {"executorch": "1.5.1"}
    assert {r.spec.format.value for r in summary.results} == set(boards)
    for result in summary.results:
        host = result.record["parity"]["metrics"]
        board = by_board[f"arm64-{boards[result.spec.format.value]}"]
        measured = board.result["artifacts"][result.record["name"]]
        assert measured["passed"] and board.result["facts"]["arch"] == "aarch64"
        # ARM's kernels round differently from x86's: close to the host's agreement, not identical to it
        assert abs(measured["metrics"]["token_agreement"] - host["token_agreement"]) < 0.03, result.record["name"]
    pte = next(r.record for r in summary.results if r.spec.format.value == "pte")
    assert (summary.folder / pte["file"]).with_suffix(".ptd").is_file()


def test_serve_writes_an_inventory_of_emulated_boards_the_harness_loads(arm64: dict) -> None:
    folder = arm64_board.default_folder()
    try:
        inventory = arm64_board.serve(folder, ("tflite-runtime-2.14",))
        (spec,) = load_inventory(inventory)
        assert spec.emulated and spec.host_key.startswith("SHA256:") and spec.name == "arm64-tflite-runtime-2.14"
        from device_tests.transport import SshDevice

        with_pinned_key = SshDevice(spec)
        assert "aarch64" in with_pinned_key.run(f"{spec.python} -c 'import platform; print(platform.machine())'").stdout
        with_pinned_key.close()
    finally:
        arm64_board.stop(folder)
    assert not list(folder.glob("sshd-*/sshd.pid"))


def test_a_board_for_an_unknown_runtime_is_refused(tmp_path: Path) -> None:
    from exporter.errors import DeviceError

    with pytest.raises(DeviceError, match="no runtime 'coreml-9'; choose one of tflite-runtime-2.14"):
        arm64_board.build(tmp_path, "coreml-9")
