"""An iPhone attached to a Mac. Neither can exist here, so every test that "has" one says fake in its name:
the Mac is a real sshd on loopback reached with Fabric for real, and its xcodebuild is tests/fakes/xcodebuild.py
(the real tool's output formats; the Benchmark app's tests done with ExecuTorch's Python runtime on the
real artifacts). The parsers are tested on text in the real formats, and the command the harness builds
is checked flag by flag."""

from __future__ import annotations

import getpass
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_tests import iphone
from device_tests.harness import Settings, run_devices
from device_tests.inventory import DeviceSpec, InventoryError, load_inventory
from device_tests.transport import deadline
from exporter.errors import DeviceError
from exporter.pipeline import export
from exporter.sources import load_model
from exporter.targets import load_target
from device_tests.loopback import keygen, make_board
from tests.conftest import MLP, copy_export

FAKES = Path(__file__).parent / "fakes"
UDID = "00008110-001A2B3C4D5E6F7A"
LOCKED_UDID = "00008120-000A1B2C3D4E5F60"

# xcodebuild test output of the Benchmark app's GenericTests on an iPhone (XCTest's log lines: a
# measurement line per metric, prefixed with the source location of the measure call).
XCTEST_OUTPUT = """\
Test Suite 'Selected tests' started at 2026-11-24 10:41:07.119.
Test Suite 'Tests.xctest' started at 2026-11-24 10:41:07.120.
Test Suite 'GenericTests' started at 2026-11-24 10:41:07.121.
Test Case '-[GenericTests test_forward_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' started.
/Users/ci/executorch/extension/benchmark/apple/Benchmark/Tests/GenericTests.mm:98: Test Case '-[GenericTests \
test_forward_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' measured [Clock Monotonic Time, s] average: 0.004, relative \
standard deviation: 5.494%, values: [0.004668, 0.004261, 0.004285, 0.004728, 0.004785], performanceMetricID:\
com.apple.dt.XCTMetric_Clock.time.monotonic, baselineName: "", baselineAverage: , polarity: prefers smaller, \
maxPercentRegression: 10.000%, maxPercentRelativeStandardDeviation: 10.000%, maxRegression: 0.100, \
maxStandardDeviation: 0.100
/Users/ci/executorch/extension/benchmark/apple/Benchmark/Tests/GenericTests.mm:98: Test Case '-[GenericTests \
test_forward_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' measured [Memory Peak Physical, kB] average: 55266.424, relative \
standard deviation: 0.000%, values: [55266.424000, 55266.424000, 55266.424000, 55266.424000, 55266.424000], \
performanceMetricID:com.apple.dt.XCTMetric_Memory.physical_peak, baselineName: "", baselineAverage: , polarity: \
prefers smaller, maxPercentRegression: 10.000%, maxPercentRelativeStandardDeviation: 10.000%, maxRegression: 0.000, \
maxStandardDeviation: 0.000
Test Case '-[GenericTests test_forward_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' passed (1.932 seconds).
Test Case '-[GenericTests test_load_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' started.
/Users/ci/executorch/extension/benchmark/apple/Benchmark/Tests/GenericTests.mm:52: error: -[GenericTests \
test_load_mobilenet_v2_pte_iOS_18_1_iPhone16_2] : ((Module(modelPath.UTF8String).load_forward()) equal to \
(Error::Ok)) failed: ("34") is not equal to ("0")
Test Case '-[GenericTests test_load_mobilenet_v2_pte_iOS_18_1_iPhone16_2]' failed (0.412 seconds).
Test Suite 'GenericTests' failed at 2026-11-24 10:41:09.466.
\t Executed 2 tests, with 1 failure (0 unexpected) in 2.344 (2.345) seconds
** TEST FAILED **
"""

DESTINATIONS = """\
\tAvailable destinations for the "Benchmark" scheme:
\t\t{ platform:macOS, arch:arm64, variant:Designed for [iPad,iPhone], id:00006001-001C30E23A42801E, name:My Mac }
\t\t{ platform:iOS, arch:arm64, id:00008110-001A2B3C4D5E6F7A, name:Anna's iPhone, the work one }
\t\t{ platform:iOS Simulator, id:5A1C3B07-7C8D-4F5E-9A6B-2C3D4E5F6A7B, OS:18.1, name:iPhone 16 }

\tIneligible destinations for the "Benchmark" scheme:
\t\t{ platform:iOS, arch:arm64, id:00008120-000A1B2C3D4E5F60, name:Lab iPhone, error:Device is locked: unlock it, \
then try again }
"""


def mac_spec(name: str = "iphone", **overrides) -> DeviceSpec:
    fields = {"transport": "mac", "host": "mac-mini.local", "workdir": "/Users/ci/edgeship work", "iphone": UDID,
              "benchmark_app": "/Users/ci/executorch/extension/benchmark/apple/Benchmark", **overrides}
    return DeviceSpec(name=name, **fields)


def test_xctest_log_is_parsed_into_cases_measurements_and_failures() -> None:
    cases = iphone.parse_xctest(XCTEST_OUTPUT)
    forward = cases["test_forward_mobilenet_v2_pte_iOS_18_1_iPhone16_2"]
    assert forward.status == "passed" and forward.kind == "forward"
    assert forward.measured[iphone.CLOCK] == [0.004668, 0.004261, 0.004285, 0.004728, 0.004785]
    assert forward.measured[iphone.MEMORY][0] == 55266.424
    load = cases["test_load_mobilenet_v2_pte_iOS_18_1_iPhone16_2"]
    assert load.status == "failed" and "load_forward()" in load.errors[0] and not load.measured
    numbers = iphone.measurements({"f": forward}, language_model=False)
    assert numbers["latency_ms"]["p50"] == pytest.approx(4.668)  # the median of the five runs, in ms
    assert numbers["iterations"] == 5 and numbers["load_ms"] is None
    assert numbers["peak_rss_mb"] == pytest.approx(55266.424 / 1024)


def test_destinations_are_parsed_with_names_that_hold_commas_and_errors() -> None:
    found = iphone.parse_destinations(DESTINATIONS)
    assert found[UDID] == {"platform": "iOS", "arch": "arm64", "id": UDID, "name": "Anna's iPhone, the work one",
                           "eligible": True}
    assert found[LOCKED_UDID]["eligible"] is False
    assert found[LOCKED_UDID]["error"] == "Device is locked: unlock it, then try again"
    assert found["00006001-001C30E23A42801E"]["variant"] == "Designed for [iPad,iPhone]"


def test_xcodebuild_command_quotes_every_value_and_keeps_writes_in_the_work_folder() -> None:
    spec = mac_spec(team="AB12CD34EF", benchmark_app="/Users/ci/my checkout; rm -rf ~/Benchmark")
    command = iphone.xcodebuild_test_command(spec, "GenericTests", "/Users/ci/edgeship work/run-1/a.xcresult")
    words = shlex.split(command)
    assert words[:2] == ["xcodebuild", "test"]
    flags = {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("-") and ":" not in word}
    assert flags["-project"] == "/Users/ci/my checkout; rm -rf ~/Benchmark/Benchmark.xcodeproj"
    assert flags["-destination"] == f"platform=iOS,id={UDID}" and flags["-parallel-testing-enabled"] == "NO"
    assert flags["-derivedDataPath"] == "/Users/ci/edgeship work/xcode"
    assert flags["-resultBundlePath"].startswith("/Users/ci/edgeship work/")
    assert "-only-testing:Tests/GenericTests" in words and "DEVELOPMENT_TEAM=AB12CD34EF" in words


def test_iphone_keys_in_the_inventory_are_validated(tmp_path: Path) -> None:
    def load(body: str) -> None:
        path = tmp_path / "devices.toml"
        path.write_text(body)
        load_inventory(path)

    with pytest.raises(InventoryError, match="'iphone' belongs to a mac device"):
        load('[[device]]\nname = "a"\ntransport = "ssh"\nhost = "h"\niphone = "00008110-001A2B3C4D5E6F7A"\n')
    with pytest.raises(InventoryError, match="is not a UDID"):
        load('[[device]]\nname = "a"\ntransport = "mac"\nhost = "h"\niphone = "my phone"\nbenchmark_app = "/b"\n')
    with pytest.raises(InventoryError, match="needs 'benchmark_app'"):
        load('[[device]]\nname = "a"\ntransport = "mac"\nhost = "h"\niphone = "00008110-001A2B3C4D5E6F7A"\n')
    with pytest.raises(InventoryError, match="needs 'iphone'"):
        load('[[device]]\nname = "a"\ntransport = "mac"\nhost = "h"\nteam = "AB12CD34EF"\n')


def test_deadline_without_coreutils_timeout_kills_the_whole_command_as_on_a_mac(tmp_path: Path) -> None:
    """macOS has no `timeout`: the perl deadline must kill the command and what it started, and exit 124."""
    marker = tmp_path / "child"
    hung = f"sleep 300 & echo $! > {shlex.quote(str(marker))}; sleep 300"
    began = time.monotonic()
    done = subprocess.run(["sh", "-c", deadline(hung, 2, use_timeout=False)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 124 and time.monotonic() - began < 60
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    kept = subprocess.run(["sh", "-c", deadline("echo out; echo err >&2; exit 3", 30, use_timeout=False)],
                          capture_output=True, text=True, check=False)
    assert (kept.returncode, kept.stdout, kept.stderr) == (3, "out\n", "err\n")


@pytest.fixture(scope="module")
def fake_mac(tmp_path_factory: pytest.TempPathFactory, shared_tiny_lm_pte: Path):
    """A real sshd on loopback playing the Mac, a fake xcodebuild on it (see the module docstring), an
    ExecuTorch checkout's Benchmark app folder, and the exports to run."""
    if not Path("/usr/sbin/sshd").exists() and not os.environ.get("CI"):  # under CI: make_board fails, naming it
        pytest.skip("needs openssh-server (make test installs it)")
    root = tmp_path_factory.mktemp("fake-mac")
    keygen(root / "client_key")
    board = make_board(root, "mac-mini", sys.executable, root / "client_key")
    (root / "iphones.json").write_text(json.dumps({UDID: {"name": "Fake iPhone 15"},
                                                   LOCKED_UDID: {"name": "Lab iPhone", "error": "Device is locked"}}))
    tool = root / "Xcode" / "xcodebuild"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\nFAKE_IPHONES={shlex.quote(str(root / 'iphones.json'))} "
                    f"exec {sys.executable} {FAKES / 'xcodebuild.py'} \"$@\"\n")
    tool.chmod(0o755)
    known_hosts = root / "known_hosts"
    known_hosts.write_text(board.known_hosts_line())
    tensors = export(load_target("raspberry-pi"), load_model(MLP), root / "dist")
    assert tensors.ok
    yield {"root": root, "board": board, "xcodebuild": str(tool), "known_hosts": known_hosts,
           "tensor_export": tensors.folder, "lm_export": copy_export(shared_tiny_lm_pte, root)}
    board.stop()


def benchmark_app(root: Path, name: str, workdir: Path, *, linked: bool = True) -> Path:
    """An ExecuTorch checkout's Benchmark app folder, its Resources linked into edgeship's work folder."""
    app = root / f"executorch-{name}" / "extension" / "benchmark" / "apple" / "Benchmark"
    (app / "Benchmark.xcodeproj").mkdir(parents=True)
    if linked:
        (workdir / iphone.RESOURCES).mkdir(parents=True)
        os.symlink(workdir / iphone.RESOURCES, app / "Resources")
    else:
        (app / "Resources").mkdir()
    return app


def fake_iphone(mac: dict, name: str, udid: str = UDID, *, linked: bool = True) -> DeviceSpec:
    workdir = mac["root"] / f"{name} work"
    app = benchmark_app(mac["root"], name, workdir, linked=linked)
    return DeviceSpec(name=name, transport="mac", host="127.0.0.1", port=mac["board"].port, user=getpass.getuser(),
                      key=str(mac["root"] / "client_key"), workdir=str(workdir), iphone=udid, benchmark_app=str(app),
                      xcodebuild=mac["xcodebuild"])


def test_fake_iphone_runs_the_real_pte_in_the_benchmark_app_and_faults_leave_the_others(fake_mac: dict) -> None:
    devices = [fake_iphone(fake_mac, "iphone-15"), fake_iphone(fake_mac, "locked-iphone", LOCKED_UDID),
               fake_iphone(fake_mac, "unplugged-iphone", "00008130-0000000000000001"),
               fake_iphone(fake_mac, "unlinked-iphone", linked=False)]
    settings = Settings(known_hosts=fake_mac["known_hosts"])
    run_folder, outcomes = run_devices(devices, fake_mac["tensor_export"], fake_mac["root"] / "results", settings)
    by_name = {o.device: o for o in outcomes}
    good = by_name["iphone-15"]
    assert good.ok, good.reason
    assert set(good.result["artifacts"]) == {"xnnpack-int8-dynamic"}  # the app runs .pte programs only
    measured = good.result["artifacts"]["xnnpack-int8-dynamic"]
    assert measured["iterations"] == 20 and len(measured["samples_ms"]) == 20 and measured["load_ms"] > 0
    assert measured["latency_ms"]["p50"] > 0 and measured["peak_rss_mb"] > 0
    assert measured["checks"] == [{"metric": "benchmark_tests_passed", "measured": 1.0, "required": 1.0, "passed": True}]
    assert "correctness is not measured on the iPhone" in measured["note"]
    assert good.result["facts"]["model"] == "Fake iPhone 15" and good.result["facts"]["os"] == "iOS"
    assert (run_folder / "iphone-15.outputs" / "xnnpack-int8-dynamic.xcodebuild.log").is_file()
    assert "correctness is not measured" in (run_folder / "report.md").read_text()
    reasons = {o.device: o.reason for o in outcomes if not o.ok}
    assert set(reasons) == {"locked-iphone", "unplugged-iphone", "unlinked-iphone"}
    assert "Device is locked" in reasons["locked-iphone"]
    assert "no iPhone 00008130-0000000000000001 attached" in reasons["unplugged-iphone"]
    assert "ln -s" in reasons["unlinked-iphone"] and "writes only in its work folder" in reasons["unlinked-iphone"]
    # Everything written on the Mac is inside the work folder, and the run's own files are gone.
    workdir = Path(devices[0].workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["cache", iphone.RESOURCES, "xcode"]
    assert not any((workdir / iphone.RESOURCES).iterdir())
    assert sorted(p.name for p in Path(devices[0].benchmark_app).iterdir()) == ["Benchmark.xcodeproj", "Resources"]
    # A second run pushes nothing: the Mac's cache has the artifact with the same checksum.
    again, outcomes = run_devices(devices[:1], fake_mac["tensor_export"], fake_mac["root"] / "results", settings)
    assert outcomes[0].ok and outcomes[0].result["pushed"] == [] and again != run_folder


def test_fake_iphone_generates_with_the_benchmark_apps_llm_test(fake_mac: dict) -> None:
    device = fake_iphone(fake_mac, "iphone-llm")
    run_folder, outcomes = run_devices([device], fake_mac["lm_export"], fake_mac["root"] / "results",
                                       Settings(known_hosts=fake_mac["known_hosts"]))
    assert outcomes[0].ok, outcomes[0].reason
    result = outcomes[0].result
    measured = result["artifacts"]["xnnpack-fp32"]
    assert measured["kind"] == "language-model" and measured["generate_tokens_per_s"] > 0
    assert measured["iterations"] == 5 and measured["latency_ms"]["p50"] > 0
    assert sorted(result["pushed"]) == ["tokenizer.json", "xnnpack-fp32.pte"]
    log = (run_folder / "iphone-llm.outputs" / "xnnpack-fp32.xcodebuild.log").read_text()
    assert "test_generate_xnnpack_fp32_llm_pte_tokenizer_json" in log  # staged under a name the LLM test takes
    assert "generation" in (run_folder / "report.md").read_text()


def test_an_iphone_is_told_when_the_export_has_no_pte_for_the_benchmark_app() -> None:
    data = {"artifacts": [{"format": "mlpackage", "status": "pending-mac"}, {"format": "tflite", "status": "passed"}]}
    with pytest.raises(DeviceError, match=r"runs \.pte programs; this export has \.mlpackage, \.tflite"):
        iphone.plan(data, mac_spec())


def test_an_iphone_is_told_that_the_benchmark_app_cannot_load_a_program_s_data_file() -> None:
    tied = {"format": "pte", "status": "passed", "file": "x.pte", "companions": [{"file": "x.ptd", "sha256": "0" * 64}]}
    with pytest.raises(DeviceError, match=r"without its \.ptd data file \(x\.ptd\).*embedding_quant = \"int8\""):
        iphone.plan({"artifacts": [tied]}, mac_spec())
    alone = {"format": "pte", "status": "passed", "file": "y.pte", "companions": []}
    assert iphone.plan({"artifacts": [tied, alone]}, mac_spec()) == [alone]


def test_devices_check_reports_a_fake_iphone_through_the_cli(fake_mac: dict) -> None:
    from tests.conftest import run_cli

    good, locked = fake_iphone(fake_mac, "check-iphone"), fake_iphone(fake_mac, "check-locked", LOCKED_UDID)
    inventory = fake_mac["root"] / "check-devices.toml"
    inventory.write_text("".join(f"""
[[device]]
name = "{spec.name}"
transport = "mac"
host = "127.0.0.1"
port = {spec.port}
user = "{spec.user}"
key = "{spec.key}"
workdir = "{spec.workdir}"
iphone = "{spec.iphone}"
benchmark_app = "{spec.benchmark_app}"
xcodebuild = "{spec.xcodebuild}"
""" for spec in (good, locked)))
    check = run_cli("devices", "check", "--devices", str(inventory), "--known-hosts", str(fake_mac["known_hosts"]))
    assert check.returncode == 1
    assert f"check-iphone: Fake iPhone 15 ({UDID}) attached to 127.0.0.1, Xcode 16.1" in check.stdout
    assert "check-locked" in check.stderr and "Device is locked" in check.stderr
