"""The device harness against real boards: OpenSSH servers on loopback, each with its own Python
environment, driven by Fabric. Faults are caused for real (wrong key, crash, hang, full disk, sshd killed)."""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device_tests.harness import Settings, run_devices
from device_tests.inventory import DeviceSpec, InventoryError, load_inventory
from exporter.pipeline import export
from exporter.runtimes import RUNTIMES, python_of
from exporter.sources import load_model
from exporter.targets import load_target, load_target_file
from device_tests.loopback import Board, keygen, make_board
from tests.boards import make_python_env
from tests.conftest import MLP, needs_sshd, write_target

pytestmark = needs_sshd


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lab")
    keygen(root / "client_key")
    pi_python = str(python_of(RUNTIMES["tflite-runtime-2.14"]))  # the raspberry-pi target's runtime, shared
    bare_python = make_python_env(root / "bare-env", "numpy<2")
    boards = {
        "pi": make_board(root, "pi", pi_python, root / "client_key"),
        "x86": make_board(root, "x86", sys.executable, root / "client_key"),
        "bare": make_board(root, "bare", bare_python, root / "client_key"),
    }
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(b.known_hosts_line() for b in boards.values()))
    summary = export(load_target("raspberry-pi"), load_model(MLP), root / "dist")
    assert summary.ok
    yield {"root": root, "boards": boards, "known_hosts": known_hosts, "export": summary.folder}
    for board in boards.values():
        board.stop()


def spec(board: Board, lab: dict, name: str | None = None, **overrides) -> DeviceSpec:
    fields = {"name": name or board.name, "transport": "ssh", "host": "127.0.0.1", "port": board.port,
              "user": getpass.getuser(), "key": str(lab["root"] / "client_key"), "python": board.python,
              "workdir": str(lab["root"] / "work" / (name or board.name)), "timeout": 60}
    fields.update(overrides)
    return DeviceSpec(**fields)


def settings(lab: dict, **overrides) -> Settings:
    return Settings(**{"iterations": 20, "warmup": 2, "time_budget_s": 10, "known_hosts": lab["known_hosts"], **overrides})


def wrapper_python(lab: dict, name: str, on_job: str) -> str:
    """A device Python that behaves on --facts/--hashes and does `on_job` when asked to run a job."""
    path = lab["root"] / f"{name}-python"
    path.write_text(f"#!/bin/sh\ncase \"$2\" in --facts|--hashes) exec {sys.executable} \"$@\";; esac\n{on_job}\n")
    path.chmod(0o755)
    return str(path)


def test_raspberry_pi_export_on_a_tflite_runtime_board_and_an_x86_board_in_parallel(lab: dict) -> None:
    pi, x86 = lab["boards"]["pi"], lab["boards"]["x86"]
    run_folder, outcomes = run_devices([spec(pi, lab), spec(x86, lab)], lab["export"], lab["root"] / "results", settings(lab))
    by_name = {o.device: o for o in outcomes}
    assert all(o.ok for o in outcomes), [(o.device, o.reason) for o in outcomes]
    pi_result = by_name["pi"].result
    assert pi_result["facts"]["runtimes"] == {"tflite_runtime": "2.14.0"}
    assert pi_result["facts"]["numpy"].startswith("1.")
    assert set(pi_result["artifacts"]) == {"litert-int8-dynamic-tensor"}  # no executorch on the Pi
    assert set(by_name["x86"].result["artifacts"]) == {"litert-int8-dynamic-tensor", "xnnpack-int8-dynamic"}
    measured = pi_result["artifacts"]["litert-int8-dynamic-tensor"]
    assert measured["iterations"] == 20
    assert 0 < measured["latency_ms"]["min"] <= measured["latency_ms"]["p50"] <= measured["latency_ms"]["max"]
    # per-tensor dynamic range: tflite-runtime 2.14 computes it as LiteRT 2.3 does (docs/measurements.md)
    assert measured["metrics"]["cosine"] > 0.9999 and measured["passed"]
    for name in ("run.json", "summary.json", "pi.json", "x86.json", "pi.log"):
        assert (run_folder / name).is_file(), name
    assert (run_folder / "pi.outputs" / "litert-int8-dynamic-tensor.outputs.npz").is_file()
    assert json.loads((run_folder / "run.json").read_text())["target"] == "raspberry-pi"


def test_second_run_skips_files_the_device_has_and_keeps_the_first_run(lab: dict) -> None:
    x86 = lab["boards"]["x86"]
    first, _ = run_devices([spec(x86, lab, "cache")], lab["export"], lab["root"] / "results", settings(lab))
    second, outcomes = run_devices([spec(x86, lab, "cache")], lab["export"], lab["root"] / "results", settings(lab))
    assert first != second and (first / "cache.json").is_file()
    assert outcomes[0].ok and outcomes[0].result["pushed"] == []
    assert set(outcomes[0].result["skipped"]) == {"litert-int8-dynamic-tensor.tflite", "xnnpack-int8-dynamic.pte", "golden.npz"}


def test_faults_on_some_devices_leave_the_others_intact(lab: dict) -> None:
    x86, bare = lab["boards"]["x86"], lab["boards"]["bare"]
    keygen(lab["root"] / "stranger_key")
    devices = [
        spec(x86, lab, "good"),
        spec(x86, lab, "wrong-key", key=str(lab["root"] / "stranger_key")),
        spec(bare, lab, "no-runtime"),
        spec(x86, lab, "crashes", python=wrapper_python(lab, "crash", "kill -SEGV $$")),
        spec(x86, lab, "hangs", python=wrapper_python(lab, "hang", "sleep 600"), timeout=5),
    ]
    run_folder, outcomes = run_devices(devices, lab["export"], lab["root"] / "results", settings(lab))
    reasons = {o.device: o.reason for o in outcomes if not o.ok}
    assert set(reasons) == {"wrong-key", "no-runtime", "crashes", "hangs"}
    assert "authentication refused" in reasons["wrong-key"]
    assert "cannot run any artifact" in reasons["no-runtime"] and "needs ai_edge_litert or tflite_runtime" in reasons["no-runtime"]
    assert "exited 139" in reasons["crashes"]
    assert "killed after 5s (timeout)" in reasons["hangs"]
    assert json.loads((run_folder / "good.json").read_text())["ok"] is True
    assert json.loads((run_folder / "summary.json").read_text())["devices"]["good"]["ok"] is True


def test_unknown_host_key_is_refused_unless_trusted_explicitly(lab: dict, tmp_path: Path) -> None:
    x86 = lab["boards"]["x86"]
    empty = tmp_path / "known_hosts"
    refused = run_devices([spec(x86, lab, "new")], lab["export"], tmp_path / "r", settings(lab, known_hosts=empty))[1][0]
    assert not refused.ok and "unknown host key" in refused.reason and "--trust-new-hosts" in refused.reason
    trusted = run_devices([spec(x86, lab, "new")], lab["export"], tmp_path / "r",
                          settings(lab, known_hosts=empty, trust_new_hosts=True))[1][0]
    assert trusted.ok, trusted.reason
    assert f"[127.0.0.1]:{x86.port}" in empty.read_text()


def test_pinned_fingerprint(lab: dict, tmp_path: Path) -> None:
    x86 = lab["boards"]["x86"]
    printed = subprocess.run(["ssh-keygen", "-lf", str(x86.folder / "host_ed25519.pub")], capture_output=True, text=True)
    pinned = printed.stdout.split()[1]
    empty = tmp_path / "known_hosts"
    ok = run_devices([spec(x86, lab, "pinned", host_key=pinned)], lab["export"], tmp_path / "r",
                     settings(lab, known_hosts=empty))[1][0]
    assert ok.ok, ok.reason
    wrong = run_devices([spec(x86, lab, "pinned", host_key="SHA256:" + "A" * 43)], lab["export"], tmp_path / "r",
                        settings(lab, known_hosts=empty))[1][0]
    assert not wrong.ok and "does not match the pinned" in wrong.reason


def test_full_disk_on_the_device(lab: dict, tmp_path: Path) -> None:
    work = tmp_path / "tiny-disk"
    work.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(work)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        outcome = run_devices([spec(lab["boards"]["x86"], lab, "full", workdir=str(work / "edgeship"))],
                              lab["export"], tmp_path / "r", settings(lab))[1][0]
    finally:
        subprocess.run(["umount", str(work)], check=False)
    assert not outcome.ok and "MB free" in outcome.reason


def test_board_lost_mid_run(lab: dict, tmp_path: Path) -> None:
    board = make_board(lab["root"] / "fragile", "fragile", wrapper_python(lab, "slow", f"sleep 4; exec {sys.executable} \"$@\""),
                       lab["root"] / "client_key")
    known = tmp_path / "known_hosts"
    known.write_text(board.known_hosts_line() + lab["boards"]["x86"].known_hosts_line())
    threading.Timer(2.5, board.stop).start()
    outcomes = run_devices([spec(board, lab), spec(lab["boards"]["x86"], lab, "steady")], lab["export"], tmp_path / "r",
                           settings(lab, known_hosts=known))[1]
    by_name = {o.device: o for o in outcomes}
    reason = by_name["fragile"].reason
    assert not by_name["fragile"].ok and ("connection lost" in reason or "did not complete" in reason), reason
    assert by_name["steady"].ok


def test_hostile_names_and_paths_reach_the_shell_quoted(lab: dict, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    workdir = str(tmp_path / f"work dir; touch {canary}")
    outcome = run_devices([spec(lab["boards"]["x86"], lab, "it's; a name", workdir=workdir)], lab["export"],
                          tmp_path / "r", settings(lab))[1][0]
    assert outcome.ok, outcome.reason
    assert not canary.exists()
    assert Path(workdir, "cache").is_dir()


INVENTORY_ERRORS = {
    '[[device]]\nname = "a"\ntransport = "ssh"\nhots = "x"\n': "unknown key 'hots' (did you mean 'host'?)",
    '[[device]]\nname = "a"\ntransport = "ssh"\n': "a ssh device needs 'host'",
    '[[device]]\nname = "a"\ntransport = "usb"\nhost = "x"\n': "transport 'usb' is not one of ssh, adb, mac",
    '[[device]]\nname = "a"\ntransport = "ssh"\nhost = "x"\nport = "22"\n': "key 'port' has the wrong type",
    '[[device]]\nname = "a"\ntransport = "ssh"\nhost = "x"\nworkdir = "/"\n': "must be a dedicated folder",
    '[[device]]\nname = "a"\ntransport = "adb"\n': "a adb device needs 'serial'",
    '[device]\nname = "a"\ntransport = "ssh"\nhost = "x"\n': "[device] is one table; write each device as [[device]]",
    'device = ["a"]\n': "device 1: must be a [[device]] table",
}


@pytest.mark.parametrize("text", sorted(INVENTORY_ERRORS))
def test_inventory_errors_name_the_file_device_and_key(text: str, tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert str(path) in str(caught.value) and INVENTORY_ERRORS[text] in str(caught.value)


def test_example_inventory_loads() -> None:
    devices = load_inventory(Path(__file__).resolve().parent.parent / "devices.example.toml")
    assert {d.transport for d in devices} == {"ssh", "adb", "mac"}


def test_cli_device_test_devices_check_and_report(lab: dict, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    pi, x86 = lab["boards"]["pi"], lab["boards"]["x86"]
    inventory = tmp_path / "devices.toml"

    def table(name: str, board: Board, transport: str, target: str) -> str:
        return f"""
[[device]]
name = "{name}"
transport = "{transport}"
host = "127.0.0.1"
port = {board.port}
user = "{getpass.getuser()}"
key = "{lab['root'] / 'client_key'}"
python = "{board.python}"
workdir = "{tmp_path / 'work' / name}"
targets = ["{target}"]
"""

    # the Pi and x86 boards, and the x86 board again posing as a Mac
    inventory.write_text(table("pi", pi, "ssh", "raspberry-pi") + table("x86", x86, "ssh", "raspberry-pi")
                         + table("mac", x86, "mac", "ios"))
    common = ["--devices", str(inventory), "--known-hosts", str(lab["known_hosts"])]
    check = run_cli("devices", "check", *common, "--device", "pi,x86")
    assert check.returncode == 0, check.stderr
    assert "pi: reachable, x86_64 Linux" in check.stdout and "runtimes: tflite_runtime 2.14.0" in check.stdout
    result = run_cli("device-test", str(lab["export"]), *common, "--iterations", "5", "--results", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr
    assert "| pi | litert-int8-dynamic-tensor |" in result.stdout and "All devices passed." in result.stdout
    run_folder = Path(result.stdout.strip().splitlines()[-1])
    assert (run_folder / "report.md").is_file()
    again = run_cli("report", str(run_folder))
    assert again.returncode == 0 and "| x86 | xnnpack-int8-dynamic |" in again.stdout
    page = (run_folder / "report.html").read_text()
    assert page.count("<svg") == 3 and "<script" not in page and "src=" not in page  # plots inline, nothing fetched
    summary = json.loads((run_folder / "summary.json").read_text())
    assert summary["ok"] and summary["devices"]["pi"]["artifacts"]["litert-int8-dynamic-tensor"]["passed"]

    # A baseline in which x86 ran twice as fast: the same run is now a regression, and CI can gate on it.
    baseline = tmp_path / "results" / "faster-baseline"
    shutil.copytree(run_folder, baseline)
    x86_result = json.loads((baseline / "x86.json").read_text())
    for measured in x86_result["artifacts"].values():
        measured["latency_ms"]["p50"] /= 2
    (baseline / "x86.json").write_text(json.dumps(x86_result))
    gated = run_cli("report", str(run_folder), "--baseline", str(baseline))
    assert gated.returncode == 3, gated.stderr
    assert "regression: x86 / xnnpack-int8-dynamic: p50" in gated.stderr and "regression: pi" not in gated.stderr
    regressions = json.loads((run_folder / "summary.json").read_text())["baseline"]["regressions"]
    assert {r["device"] for r in regressions} == {"x86"} and len(regressions) == 2
    assert "REGRESSION" in (run_folder / "report.html").read_text()
    assert run_cli("report", str(run_folder), "--baseline", str(run_folder)).returncode == 0
    typo = run_cli("device-test", str(lab["export"]), *common, "--baseline", str(tmp_path / "nope"))
    assert typo.returncode == 2 and "not a device run folder" in typo.stderr
    mac = run_cli("device-test", str(lab["export"]), *common, "--device", "mac")  # a Linux box posing as a Mac
    assert mac.returncode == 1 and "runs Linux, not macOS; Core ML needs a Mac" in mac.stderr


def test_cli_names_failed_devices_and_how_to_rerun_them(lab: dict, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    inventory = tmp_path / "devices.toml"
    inventory.write_text(f"""
[[device]]
name = "bare board"
transport = "ssh"
host = "127.0.0.1"
port = {lab['boards']['bare'].port}
user = "{getpass.getuser()}"
key = "{lab['root'] / 'client_key'}"
python = "{lab['boards']['bare'].python}"
workdir = "{tmp_path / 'work'}"
""")
    result = run_cli("device-test", str(lab["export"]), "--devices", str(inventory), "--known-hosts",
                     str(lab["known_hosts"]), "--results", str(tmp_path / "results"))
    assert result.returncode == 1
    assert "error: bare board: bare board (x86_64, runtimes: none) cannot run any artifact" in result.stderr
    assert "--device 'bare board'" in result.stderr


def test_html_report_escapes_names_from_the_inventory(tmp_path: Path) -> None:
    from device_tests.report import render_html

    hostile = "<script>alert(1)</script>"
    (tmp_path / "run.json").write_text(json.dumps({
        "export": "dist/x", "manifest_sha256": "0" * 64, "target": "raspberry-pi", "model": "m",
        "devices": [hostile], "runner_version": "2", "settings": {}, "started": "now"}))
    page = render_html(tmp_path)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "no result (the run was interrupted)" in page


def test_language_model_on_an_executorch_board_measures_tokens_per_second_and_matches_the_host(
        lab: dict, tmp_path: Path) -> None:
    """A tiny Llama GGUF (Q4_1 linears) exported for android (blocks carried), then run on the x86 board:
    the device's next-token agreement and greedy match are the host's (same program, same runtime)."""
    from exporter.sources import SourceOptions
    from tests.conftest import make_tiny_gguf

    # android's own thresholds are set for the real model; a tiny random one agrees less with itself
    android = load_target("android").path.read_text()
    android = (android.replace("min_token_agreement = 0.9 ", "min_token_agreement = 0.8 ")
               .replace("min_token_agreement = 0.88 ", "min_token_agreement = 0.5 ").replace("max_mean_kl = 0.03", "max_mean_kl = 0.1"))
    target = load_target_file(write_target(tmp_path, "android-for-a-random-model", android))
    gguf = make_tiny_gguf(tmp_path / "tiny-llama.Q4_1.gguf")
    summary = export(target, load_model(str(gguf), SourceOptions(context_len=128)), tmp_path / "dist")
    host, host_tflite = summary.results[0].record, summary.results[1].record
    assert summary.ok, (host.get("failures"), host_tflite.get("failures"), host_tflite.get("error"))
    linears = [d for d in host["quantisation"]["layers"] if d["kind"] == "linear"]
    carried = [d["layer"] for d in linears if "carried exactly from the GGUF's Q4_1 blocks" in d["detail"]]
    assert len(carried) == 2 * 7 and host["details"]["carried_gguf_blocks"] == 14
    head = next(d for d in linears if d["layer"] == "lm_head")
    assert head["quantised"] and head["detail"].startswith("int8 per channel")

    pi, x86 = lab["boards"]["pi"], lab["boards"]["x86"]
    run_folder, outcomes = run_devices([spec(x86, lab, "lm-board"), spec(pi, lab, "pi-lm")], summary.folder,
                                       tmp_path / "results", settings(lab))
    by_name = {o.device: o for o in outcomes}
    assert by_name["lm-board"].ok, by_name["lm-board"].reason
    measured = by_name["lm-board"].result["artifacts"]["xnnpack-q4"]
    wanted = host["parity"]["metrics"]
    assert measured["metrics"]["token_agreement"] == pytest.approx(wanted["token_agreement"], abs=1e-9)
    assert measured["metrics"]["greedy_match"] == pytest.approx(wanted["greedy_match"], abs=1e-9)
    assert measured["decode_tokens_per_s"] > 0 and measured["prefill_tokens_per_s"] > 0 and measured["ttft_ms"] > 0
    assert "xnnpack-q4.ptd" in by_name["lm-board"].result["pushed"]  # its tied table, loaded beside the program
    assert [c["metric"] for c in measured["checks"]] == ["min_token_agreement"] and measured["passed"]
    # the .tflite steps its signatures on the board with the host's own stepper: the same agreement
    on_board = by_name["lm-board"].result["artifacts"]["litert-int8-dynamic"]
    assert on_board["metrics"]["token_agreement"] == pytest.approx(host_tflite["parity"]["metrics"]["token_agreement"],
                                                                   abs=1e-9)
    assert on_board["decode_tokens_per_s"] > 0 and on_board["passed"]
    # The Pi board has tflite-runtime 2.14 only: no .pte there, and that runtime cannot load litert-torch's
    # LLM programs (an op newer than it); the device's result says so, per artifact.
    pi_result = by_name["pi-lm"].result
    assert set(pi_result["artifacts"]) == {"litert-int8-dynamic"}, by_name["pi-lm"].reason
    assert "old TFLite binary with newer model" in pi_result["artifacts"]["litert-int8-dynamic"]["error"]
    assert not by_name["pi-lm"].ok
    assert "| lm-board | xnnpack-q4 |" in (run_folder / "report.md").read_text()
    assert "decode" in (run_folder / "report.md").read_text()


def test_t5_on_boards_encodes_once_and_decodes_as_on_the_host(lab: dict, tmp_path: Path) -> None:
    """A tiny Flan-T5 exported to .pte (encode and decode methods) and .tflite (encode and decode
    signatures), run on the x86 board: the device's decoder agreement and greedy answers are the host's.
    On the Pi board (tflite-runtime 2.14) the per-channel int8 .tflite runs but computes wrong, and the
    device's verdict says so; the per-tensor one, the raspberry-pi target's scheme, passes."""
    from exporter.sources import SourceOptions
    from tests.text_to_text import make_tiny_t5

    target = load_target_file(write_target(tmp_path, "t5-boards", """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
[artifact.parity]
min_token_agreement = 0.8
[[artifact]]
format = "tflite"
quant = "int8-dynamic"
[artifact.parity]
min_token_agreement = 0.8
[[artifact]]
format = "tflite"
quant = "int8-dynamic-tensor"
[artifact.parity]
min_token_agreement = 0.8
"""))
    folder = make_tiny_t5(tmp_path / "flan-t5-tiny")
    summary = export(target, load_model(str(folder), SourceOptions(seq_len=32, context_len=16)), tmp_path / "dist")
    assert summary.ok, [(r.spec.name, r.record.get("failures"), r.record.get("error")) for r in summary.results]
    hosts = {r.spec.name: r.record["parity"]["metrics"] for r in summary.results}
    x86, pi = lab["boards"]["x86"], lab["boards"]["pi"]
    run_folder, outcomes = run_devices([spec(x86, lab, "t5-board"), spec(pi, lab, "t5-pi")], summary.folder,
                                       tmp_path / "results", settings(lab))
    by_name = {o.device: o for o in outcomes}
    assert by_name["t5-board"].ok, by_name["t5-board"].reason
    for name in ("xnnpack-int8-dynamic", "litert-int8-dynamic", "litert-int8-dynamic-tensor"):
        measured = by_name["t5-board"].result["artifacts"][name]
        assert measured["kind"] == "text-to-text" and measured["passed"], measured
        assert measured["metrics"]["token_agreement"] == pytest.approx(hosts[name]["token_agreement"], abs=1e-9)
        assert measured["metrics"]["greedy_match"] == pytest.approx(hosts[name]["greedy_match"], abs=1e-9)
        assert measured["decode_tokens_per_s"] > 0 and measured["encode_ms"] > 0
    pi_result = by_name["t5-pi"].result["artifacts"]
    assert set(pi_result) == {"litert-int8-dynamic", "litert-int8-dynamic-tensor"}, by_name["t5-pi"].reason
    assert not pi_result["litert-int8-dynamic"]["passed"]
    assert pi_result["litert-int8-dynamic"]["metrics"]["token_agreement"] < 0.5  # measured 0.08
    assert pi_result["litert-int8-dynamic-tensor"]["passed"], pi_result["litert-int8-dynamic-tensor"]
    assert not by_name["t5-pi"].ok
    assert "encode" in (run_folder / "report.md").read_text()


def test_a_folder_artifact_is_pushed_as_one_archive_and_skipped_when_intact(lab: dict, tmp_path: Path) -> None:
    """An .mlpackage is a folder: it travels as a tar, is unpacked in place, and the device's digest of
    the unpacked folder equals the manifest's (so the next run skips it)."""
    from device_tests.transport import push
    from device_tests.transport import SshDevice
    from exporter import files

    package = tmp_path / "model.mlpackage"
    for relative, data in (("Manifest.json", b"{}"), ("Data/a-b", b"1"), ("Data/a/b", b"2"), ("Data/weights.bin", b"3" * 4096)):
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_bytes(data)
    x86 = lab["boards"]["x86"]
    device = SshDevice(spec(x86, lab, "folders"), known_hosts=lab["known_hosts"])
    try:
        remote = str(lab["root"] / "work" / "folders" / "cache" / "abc.mlpackage")
        device.run(f"mkdir -p {shlex.quote(str(Path(remote).parent))} {shlex.quote(remote)}")
        device.run(f"touch {shlex.quote(remote)}/stale-partial-file")  # a partial copy from a killed run
        push(device, package, remote, tmp_path)
        hashes = json.loads(device.run(f"{x86.python} -c 'import json,sys; sys.path.insert(0, \"{Path.cwd()}\"); "
                                       f"from device_tests.runner import sha256; print(json.dumps(sha256(\"{remote}\")))'").stdout)
        assert hashes == files.sha256_of(package)
        assert not Path(remote + ".tar").exists() and not (Path(remote) / "stale-partial-file").exists()
    finally:
        device.close()


def test_the_runner_loads_executorch_without_its_compiler(shared_tiny_lm_pte: Path) -> None:
    """A board loads ExecuTorch's runtime and LLM kernels only: the compiler's import (torch's dynamo and
    inductor) is most of the load time on a small board and would count in its measured memory."""
    program = shared_tiny_lm_pte / "xnnpack-fp32.pte"
    code = ("import json, sys; from device_tests.runner import pte_lm_stepper; step = pte_lm_stepper(sys.argv[1]); "
            "logits = step([1, 2, 3], 0); print(json.dumps([len(logits), float(abs(logits).sum()), "
            "sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor', 'executorch.exir')))]))")
    done = subprocess.run([sys.executable, "-c", code, str(program)], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    vocabulary, magnitude, compiler = json.loads(done.stdout.strip().splitlines()[-1])
    assert vocabulary == 49152 and magnitude > 0  # SmolLM2's vocabulary, real logits through the custom SDPA op
    assert compiler == ["executorch.exir._warnings"]


def test_a_board_whose_port_was_taken_serves_on_another(tmp_path: Path) -> None:
    """Boards started side by side (two test workers) can both be handed one free port: the second moves."""
    import socket

    keygen(tmp_path / "client_key")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        folder = tmp_path / "board"
        folder.mkdir()
        keygen(folder / "host_ed25519")
        (folder / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
        board = Board("moved", folder, taken, sys.executable, tmp_path / "client_key").start()
        try:
            assert board.port != taken and f"Port {board.port}" in (folder / "sshd_config").read_text()
            with socket.create_connection(("127.0.0.1", board.port), timeout=10) as client:
                assert client.recv(64).startswith(b"SSH-2.0-OpenSSH")
        finally:
            board.stop()
