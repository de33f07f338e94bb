"""The adb transport. No Android phone can be attached here, so every test that "has" a phone says
fake in its name: the phone is tests/fakes/adb.py (adb's three calls, its messages and exit codes) and
the binaries on it are stand-ins for executor_runner and benchmark_model that take the real flags, print
the real tools' log lines and run the real artifact with ExecuTorch's and LiteRT's Python runtimes, and
for llama_main, whose flags are handed to ExecuTorch's own TextLLMRunner (the C++ llama_main calls).
The parsers are tested on text in the real tools' formats (ET_LOG and TFLITE_LOG lines as their
sources print them), and the commands the harness builds are checked flag by flag."""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from device_tests import adb
from device_tests.harness import Settings, run_devices
from device_tests.inventory import DeviceSpec
from exporter.errors import DeviceError
from exporter.pipeline import export
from exporter.sources import load_model
from exporter.targets import load_target
from device_tests.loopback import keygen, make_board
from tests.conftest import MLP, copy_export, needs_sshd

FAKES = Path(__file__).parent / "fakes"

# What executor_runner prints (stderr, ET_LOG format "%c %02u:%02u:%02u.%06lu executorch:%s:%zu] %s").
EXECUTOR_RUNNER_OUTPUT = """\
I 00:00:00.000812 executorch:executor_runner.cpp:182] Model file /data/local/tmp/edgeship-work/cache/ab.pte is loaded.
I 00:00:00.000841 executorch:executor_runner.cpp:191] Using method forward
I 00:00:00.000845 executorch:executor_runner.cpp:238] Setting up planned buffer 0, size 3072.
I 00:00:00.031250 executorch:executor_runner.cpp:261] Method loaded.
I 00:00:00.031300 executorch:executor_runner.cpp:393] Loading inputs from input file(s).
I 00:00:00.034102 executorch:executor_runner.cpp:770] Iteration 1 of 3: 2.734000 ms
I 00:00:00.035980 executorch:executor_runner.cpp:770] Iteration 2 of 3: 1.851000 ms
I 00:00:00.037811 executorch:executor_runner.cpp:770] Iteration 3 of 3: 1.799000 ms
I 00:00:00.037830 executorch:executor_runner.cpp:780] Model executed successfully 3 time(s) in 6.384000 ms.
I 00:00:00.037840 executorch:executor_runner.cpp:798] 1 outputs: 
Output 0: tensor(sizes=[1, 10], [0.1, 0.2, ...])
"""

# What benchmark_model prints (TFLITE_LOG "INFO: " lines; StatWithPercentiles adds p5/median/p95).
BENCHMARK_MODEL_OUTPUT = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Graph: [/data/local/tmp/edgeship-work/cache/cd.tflite]
INFO: Loaded model /data/local/tmp/edgeship-work/cache/cd.tflite
INFO: The input model file size (MB): 0.034
INFO: Initialized session in 5.23ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=3817 first=402 curr=98 min=95 max=402 avg=110.5 std=15 p5=96 median=108 p95=131

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=9123 first=101 curr=99 min=94 max=311 avg=104.7 std=9 p5=96 median=103 p95=118

INFO: Inference timings in us: Init: 5230, First inference: 402, Warmup (avg): 110.5, Inference (avg): 104.7
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=2.5 overall=3.1
INFO: Overall peak memory footprint (MB) via periodic monitoring: 7.9
"""

# What llama_main prints on a Linux build: the prompt, the generated pieces, a newline and the
# PyTorchObserver report on stdout; ET_LOG lines on stderr.
LLAMA_MAIN_STDOUT = """\
<|im_start|>user
What is the capital of Japan?<|im_end|>
<|im_start|>assistant
The capital of Japan is Tokyo.<|im_end|>

PyTorchObserver {"prefill_token_per_sec":347.826,"decode_token_per_sec":95.8904,"prompt_tokens":16,\
"generated_tokens":7,"model_load_start_ms":1795547388226,"model_load_end_ms":1795547388969,\
"inference_start_ms":1795547388969,"inference_end_ms":1795547389088,"prompt_eval_end_ms":1795547389015,\
"first_token_ms":1795547389015,"aggregate_sampling_time_ms":0,"SCALING_FACTOR_UNITS_PER_SECOND":1000}
"""
LLAMA_MAIN_STDERR = """\
[llm_runner_helper.cpp:137] Metadata: get_max_context_len = 512
[text_llm_runner.cpp:89] RSS after loading model: 592.218750 MiB (0 if unsupported)
[text_token_generator.h:181] 
Reached to the end of generation
[text_llm_runner.cpp:258] RSS after finishing text generation: 601.5 MiB (0 if unsupported)
[stats.h:175] 	Prompt Tokens: 16    Generated Tokens: 7
"""

GETPROP_AND_DF = """\
arm64-v8a
14
Pixel 8
Filesystem                 1K-blocks     Used Available Use% Mounted on
/dev/block/bootdevice/by-name/userdata
                           115569880 32517424  82921384  29% /data
runner-present
"""


def phone_spec(name: str = "pixel", **overrides) -> DeviceSpec:
    fields = {"name": name, "transport": "adb", "host": "", "serial": "SERIAL1",
              "runner": "/data/local/tmp/executor_runner", "workdir": "edgeship-work", "timeout": 120}
    fields.update(overrides)
    return DeviceSpec(**fields)


def test_executor_runner_output_is_parsed_into_load_time_and_per_iteration_latency() -> None:
    times = adb.parse_executor_runner(EXECUTOR_RUNNER_OUTPUT)
    assert times.iterations_ms == [2.734, 1.851, 1.799]
    assert times.load_ms == pytest.approx(31.25)
    with pytest.raises(ValueError, match="no 'Iteration i of N"):
        adb.parse_executor_runner("E 00:00:00.000100 executorch:executor_runner.cpp:120] Could not load program")


def test_benchmark_model_output_is_parsed_from_its_summary_lines() -> None:
    times = adb.parse_benchmark_model(BENCHMARK_MODEL_OUTPUT)
    assert times.init_ms == pytest.approx(5.23) and times.first_ms == pytest.approx(0.402)
    assert times.runs["count"] == 9123 and times.runs["median"] == pytest.approx(0.103)  # the timed runs, not warm-up
    assert times.peak_mb == pytest.approx(7.9)
    latency = adb.latency_from_summary(times.runs)
    assert latency["p50"] == pytest.approx(0.103) and latency["p90"] is None  # never invented
    older = "count=50 first=79449 curr=81350 min=77385 max=88213 avg=79732 std=1929\n" \
            "Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9\n"
    assert adb.parse_benchmark_model(older).init_ms == pytest.approx(38.467)
    with pytest.raises(ValueError, match="did the model fail to load"):
        adb.parse_benchmark_model("ERROR: Could not open '/data/local/tmp/x.tflite'.\n")


def test_phone_facts_are_read_from_getprop_and_a_wrapped_df_row() -> None:
    facts = adb.parse_facts(GETPROP_AND_DF, phone_spec())
    assert facts["arch"] == "aarch64" and facts["model"] == "Pixel 8" and facts["release"] == "14"
    assert facts["free_bytes"] == 82921384 * 1024 and facts["runner_format"] == "pte"
    assert facts["runtimes"] == {"executor_runner": "native"}


def test_built_commands_quote_every_value_for_host_and_phone() -> None:
    phone = adb.AdbPhone(phone_spec(serial="SER; rm -rf /", adb="/opt/sdk/platform tools/adb"), adb.LocalHost())
    line = phone.adb("shell", "ls 'a b'")
    assert shlex.split(line) == ["/opt/sdk/platform tools/adb", "-s", "SER; rm -rf /", "shell", "ls 'a b'"]
    command = adb.executor_runner_command("/data/local/tmp/executor_runner", "/w/m y.pte", ["/w/a.bin", "/w/b.bin"],
                                          "/w/out", 5)
    assert shlex.split(command) == ["/data/local/tmp/executor_runner", "--model_path=/w/m y.pte", "--num_executions=5",
                                    "--inputs=/w/a.bin,/w/b.bin", "--output_file=/w/out"]
    command = adb.executor_runner_command("/r", "/w/m.pte", [], None, 1, "/w/cache/ab cd.ptd")
    assert shlex.split(command) == ["/r", "--model_path=/w/m.pte", "--num_executions=1", "--data_path=/w/cache/ab cd.ptd"]
    command = adb.llama_main_command("/l", "/w/m.pte", "/w/t.json", "/w/p.txt", 8, data="/w/cache/d.ptd")
    assert "--data_paths=/w/cache/d.ptd" in shlex.split(command)
    command = adb.benchmark_model_command("/data/local/tmp/benchmark_model", "/w/m.tflite",
                                          {"x": ("/w/x.bin", (1, 16)), "mask": ("/w/m.bin", (1, 8))}, "/w/out.bin", 40, 3)
    assert shlex.split(command)[1:] == ["--graph=/w/m.tflite", "--num_runs=40", "--warmup_runs=3",
                                        "--report_peak_memory_footprint=true", "--input_layer=x,mask",
                                        "--input_layer_shape=1,16:1,8",
                                        "--input_layer_value_files=x:/w/x.bin,mask:/w/m.bin", "--output_filepath=/w/out.bin"]


def test_a_runner_that_is_neither_tool_is_named() -> None:
    with pytest.raises(DeviceError, match="none of ExecuTorch's executor_runner or llama_main or LiteRT's"):
        adb.runner_kind(phone_spec(runner="/data/local/tmp/my_app"))


def test_llama_main_output_is_parsed_into_its_report_and_the_generated_text() -> None:
    prompt = "<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n"
    run = adb.parse_llama_main(LLAMA_MAIN_STDOUT, LLAMA_MAIN_STDERR, prompt)
    assert run.text == "The capital of Japan is Tokyo.<|im_end|>\n"  # EOS prints a newline of its own
    assert run.stats["prompt_tokens"] == 16 and run.stats["generated_tokens"] == 7
    assert run.peak_rss_mb == pytest.approx(601.5)
    with pytest.raises(ValueError, match="no 'PyTorchObserver"):
        adb.parse_llama_main("", "E 00:00:00.000100 executorch:main.cpp:12] Failed to create llama runner\n", prompt)
    command = adb.llama_main_command("/data/local/tmp/llama_main", "/w/m y.pte", "/w/tok.json", "/w/p 0.txt", 32,
                                     warmup=True)
    assert shlex.split(command) == ["/data/local/tmp/llama_main", "--model_path=/w/m y.pte",
                                    "--tokenizer_path=/w/tok.json", "--prompt_file=/w/p 0.txt", "--temperature=0",
                                    "--max_new_tokens=32", "--warmup"]


def test_greedy_text_is_matched_token_by_token_through_the_decoded_prefix() -> None:
    pieces = {1: "Tok", 2: "yo", 3: ".", 4: "\xe2", 5: "\x82\xac"}  # 4 and 5: one character's bytes

    def decode(ids):
        raw = "".join(pieces[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    assert adb.matched_tokens(decode, [1, 2, 3], "Tokyo.") == 3
    assert adb.matched_tokens(decode, [1, 2, 3], "Tokio.") == 1
    assert adb.matched_tokens(decode, [1, 4, 5, 3], "Tok\u20ac.") == 4  # a split character counts once whole
    assert adb.matched_tokens(decode, [1, 4, 5, 3], "Tok.") == 4  # llama_main drops one-byte pieces it can't print
    assert adb.matched_tokens(decode, [2], "Tokyo") == 0


@pytest.fixture(scope="module")
def phones(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fake phones (see the module docstring) with real stand-in binaries, and an export to test."""
    root = tmp_path_factory.mktemp("phones")
    tools = root / "platform-tools"
    tools.mkdir()
    shutil.copy(FAKES / "adb.py", tools / "adb.py")
    (tools / "adb").write_text(f"#!/bin/sh\nexec {sys.executable} {tools / 'adb.py'} \"$@\"\n")
    (tools / "adb").chmod(0o755)
    bins = {}
    for tool in ("executor_runner", "benchmark_model", "llama_main"):
        bins[tool] = root / "phone-bin" / tool
        bins[tool].parent.mkdir(exist_ok=True)
        bins[tool].write_text(f"#!/bin/sh\nexec {sys.executable} {FAKES / (tool + '.py')} \"$@\"\n")
        bins[tool].chmod(0o755)
    props = {"ro.product.cpu.abi": "arm64-v8a", "ro.build.version.release": "14", "ro.product.model": "Fake Pixel"}
    (tools / "phones.json").write_text(json.dumps({
        "PTE1": {"props": props}, "TFL1": {"props": props},
        "FULL1": {"props": props, "free_bytes": 1000},  # adb push fails with "No space left on device"
    }))
    summary = export(load_target("raspberry-pi"), load_model(MLP), root / "dist")
    assert summary.ok
    return {"root": root, "adb": str(tools / "adb"), "bins": bins, "export": summary.folder}


def fake_phone(phones: dict, name: str, serial: str, tool: str, **overrides) -> DeviceSpec:
    fields = {"serial": serial, "adb": phones["adb"], "runner": str(phones["bins"][tool]),
              "workdir": str(phones["root"] / "phone-storage" / name), **overrides}
    return phone_spec(name, **fields)


def test_fake_phones_run_the_real_pte_and_tflite_through_their_native_runner_flags(phones: dict) -> None:
    devices = [fake_phone(phones, "pixel-pte", "PTE1", "executor_runner"),
               fake_phone(phones, "galaxy-tflite", "TFL1", "benchmark_model")]
    settings = Settings(iterations=12, warmup=2)
    run_folder, outcomes = run_devices(devices, phones["export"], phones["root"] / "results", settings)
    by_name = {o.device: o for o in outcomes}
    assert all(o.ok for o in outcomes), [(o.device, o.reason) for o in outcomes]
    pte = by_name["pixel-pte"].result["artifacts"]["xnnpack-int8-dynamic"]
    assert set(by_name["pixel-pte"].result["artifacts"]) == {"xnnpack-int8-dynamic"}  # executor_runner runs .pte only
    assert pte["iterations"] == 12 and len(pte["samples_ms"]) == 12 and pte["load_ms"] > 0
    assert pte["metrics"]["cosine"] > 0.999 and pte["passed"]
    tfl = by_name["galaxy-tflite"].result["artifacts"]["litert-int8-dynamic-tensor"]
    assert tfl["iterations"] >= 12 and tfl["latency_ms"]["p50"] > 0 and tfl["peak_rss_mb"] > 0
    assert tfl["metrics"]["cosine"] > 0.999 and tfl["passed"]
    facts = by_name["pixel-pte"].result["facts"]
    assert facts["os"] == "Android" and facts["abi"] == "arm64-v8a" and facts["model"] == "Fake Pixel"
    # outputs pulled back from the phone and kept with the run
    saved = np.load(run_folder / "galaxy-tflite.outputs" / "litert-int8-dynamic-tensor.outputs.npz")
    assert saved.files and (run_folder / "report.html").is_file()
    assert "| pixel-pte | xnnpack-int8-dynamic |" in (run_folder / "report.md").read_text()
    # nothing of the run is left on the phone but the artifact cache
    assert [p.name for p in (phones["root"] / "phone-storage" / "pixel-pte").iterdir()] == ["cache"]
    again, outcomes = run_devices(devices[:1], phones["export"], phones["root"] / "results", settings)
    assert outcomes[0].ok and outcomes[0].result["pushed"] == [] and again != run_folder


def test_fake_phone_faults_are_named_and_leave_the_good_phone_intact(phones: dict) -> None:
    devices = [fake_phone(phones, "good", "PTE1", "executor_runner"),
               fake_phone(phones, "unplugged", "GONE1", "executor_runner"),
               fake_phone(phones, "no-runner", "PTE1", "executor_runner",
                          runner=str(phones["root"] / "phone-bin" / "missing" / "executor_runner")),
               fake_phone(phones, "storage-full", "FULL1", "executor_runner")]
    run_folder, outcomes = run_devices(devices, phones["export"], phones["root"] / "results", Settings(iterations=3))
    reasons = {o.device: o.reason for o in outcomes if not o.ok}
    assert set(reasons) == {"unplugged", "no-runner", "storage-full"}
    assert "adb cannot reach phone GONE1" in reasons["unplugged"] and "not found" in reasons["unplugged"]
    assert "no executable runner" in reasons["no-runner"] and "chmod +x" in reasons["no-runner"]
    assert "No space left on device" in reasons["storage-full"]
    assert json.loads((run_folder / "good.json").read_text())["ok"] is True


@needs_sshd
def test_fake_phone_attached_to_a_lab_host_reached_over_real_ssh(phones: dict) -> None:
    """The phone hangs off another machine: Fabric reaches that host for real (sshd on loopback),
    files are staged there, and adb runs there."""
    root = phones["root"]
    keygen(root / "client_key")
    board = make_board(root, "lab-host", sys.executable, root / "client_key")
    try:
        known_hosts = root / "known_hosts"
        known_hosts.write_text(board.known_hosts_line())
        device = fake_phone(phones, "remote-pixel", "PTE1", "executor_runner", host="127.0.0.1", port=board.port,
                            user=getpass.getuser(), key=str(root / "client_key"),
                            host_workdir=str(root / "lab-host-staging"))
        _, outcomes = run_devices([device], phones["export"], root / "results",
                                  Settings(iterations=5, known_hosts=known_hosts))
        assert outcomes[0].ok, outcomes[0].reason
        assert (root / "lab-host-staging" / "staging").is_dir()  # files went through the host
        assert outcomes[0].result["artifacts"]["xnnpack-int8-dynamic"]["metrics"]["cosine"] > 0.999
    finally:
        board.stop()


@pytest.fixture(scope="module")
def tiny_lm_export(phones: dict, shared_tiny_lm_pte: Path) -> Path:
    return copy_export(shared_tiny_lm_pte, phones["root"])


def test_fake_phone_generates_with_llama_main_and_its_answers_are_compared_on_the_host(
        phones: dict, tiny_lm_export: Path) -> None:
    device = fake_phone(phones, "pixel-llm", "PTE1", "llama_main")
    run_folder, outcomes = run_devices([device], tiny_lm_export, phones["root"] / "results", Settings(warmup=1))
    assert outcomes[0].ok, outcomes[0].reason
    result = outcomes[0].result
    measured = result["artifacts"]["xnnpack-fp32"]
    assert measured["kind"] == "language-model" and measured["passed"], measured.get("checks") or measured.get("error")
    assert measured["metrics"]["greedy_match"] == 1.0 and measured["metrics"]["same_as_host"] == 1.0
    judged = {c["metric"]: c for c in measured["checks"]}
    assert set(judged) == {"min_greedy_match", "greedy_match_vs_host"}  # token agreement needs logits: not on phones
    assert measured["decode_tokens_per_s"] > 0 and measured["prefill_tokens_per_s"] > 0 and measured["ttft_ms"] >= 0
    assert measured["iterations"] > 0 and measured["load_ms"] >= 0
    manifest = json.loads((tiny_lm_export / "manifest.json").read_text())
    host_generations = manifest["artifacts"][0]["generations"]  # what the host's run generated
    assert [adb.printable(t) for t in measured["generations"]] == [adb.printable(t) for t in host_generations]
    assert sorted(result["pushed"]) == ["tokenizer.json", "xnnpack-fp32.pte"]
    assert (run_folder / "pixel-llm.outputs" / "xnnpack-fp32.generations.json").is_file()
    assert "decode" in (run_folder / "report.md").read_text()
    _, outcomes = run_devices([device], tiny_lm_export, phones["root"] / "results", Settings())
    assert outcomes[0].ok and outcomes[0].result["pushed"] == []


def test_fake_phone_with_the_wrong_runner_for_the_export_is_told_which_one_it_needs(
        phones: dict, tiny_lm_export: Path) -> None:
    _, outcomes = run_devices([fake_phone(phones, "tensor-runner", "PTE1", "executor_runner")], tiny_lm_export,
                              phones["root"] / "results", Settings())
    assert not outcomes[0].ok and "point 'runner' at its llama_main binary" in outcomes[0].reason
    _, outcomes = run_devices([fake_phone(phones, "llm-runner", "PTE1", "llama_main")], phones["export"],
                              phones["root"] / "results", Settings())
    assert not outcomes[0].ok and "llama_main runs language models only" in outcomes[0].reason


def test_fake_phone_runs_a_program_with_its_data_file(phones: dict, smollm2_tokenizer_folder: Path) -> None:
    """A .pte whose tied embedding/lm_head table lives in a .ptd beside it: both pushed, and llama_main given
    --data_paths (the real binary's flag), so it generates what the host generated with the pair."""
    from exporter.sources import SourceOptions
    from exporter.targets import load_target_file
    from tests.conftest import make_tiny_lm, write_target

    target = load_target_file(write_target(phones["root"], "lm-tied", """
[[artifact]]
format = "pte"
quant = "int8-dynamic"
embedding_quant = "tied"
[artifact.parity]
min_token_agreement = 0.5
"""))
    model = load_model(str(make_tiny_lm(phones["root"] / "tiny-llama-tied", "llama", smollm2_tokenizer_folder)),
                       SourceOptions(context_len=128))
    summary = export(target, model, phones["root"] / "tied-dist")
    assert summary.ok and summary.results[0].record["companions"][0]["file"] == "xnnpack-int8-dynamic.ptd"
    _, outcomes = run_devices([fake_phone(phones, "pixel-tied", "PTE1", "llama_main")], summary.folder,
                              phones["root"] / "results", Settings())
    assert outcomes[0].ok, outcomes[0].reason
    result = outcomes[0].result
    assert sorted(result["pushed"]) == ["tokenizer.json", "xnnpack-int8-dynamic.ptd", "xnnpack-int8-dynamic.pte"]
    measured = result["artifacts"]["xnnpack-int8-dynamic"]
    assert measured["metrics"]["same_as_host"] == 1.0 and measured["decode_tokens_per_s"] > 0
