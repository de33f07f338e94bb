"""Android phones over adb: the phone runs a native benchmark binary, not Python.

The phone is attached to a host: this machine (no ``host`` in the inventory) or a lab machine reached
over SSH with Fabric (then files are staged on the host before ``adb push``). Everything on the phone
happens through ``adb -s SERIAL push/shell/pull``; values reach the phone's shell quoted.

The runner on the phone is named by the inventory: ExecuTorch's ``executor_runner`` runs .pte programs
(``--model_path --inputs --output_file --num_executions``), LiteRT's ``benchmark_model`` runs .tflite
(``--graph --input_layer_value_files --output_filepath``). Their printed timings are parsed here, their
raw output files are pulled back and compared with the golden outputs on the host, with the same
metrics and thresholds as the Python runner on boards.

Language models run in ExecuTorch's LLM runner ``llama_main`` (its TextLLMRunner, the code its apps use):
each fixed prompt greedily, the tokenizer pushed beside the .pte; its ``PyTorchObserver {json}`` report
gives load time, time to first token, prefill and decode tokens/s, and the text it printed is compared
on the host with the eager model's greedy answers.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from exporter import files
from exporter.errors import DeviceError
from exporter.manifest import program_data_files

from . import runner as device_runner
from .inventory import DeviceSpec
from .report import METRIC_TOLERANCE
from .transport import Completed, ConnectError, RemoteCommandError, SshDevice

PHONE_ROOT = "/data/local/tmp"  # the folder adb shell may write to on every phone
RUNNER_KINDS = {"executor_runner": "pte", "benchmark_model": "tflite", "llama_main": "pte"}
LM_RUNNER = "llama_main"


class LocalHost:
    """The machine edgeship runs on, when the phone is plugged into it."""

    name = "this machine"

    def run(self, command: str, *, timeout: int, check: bool = True) -> Completed:
        try:
            done = subprocess.run(["sh", "-c", command], check=False, capture_output=True, encoding="utf-8",
                                  errors="replace", timeout=timeout)  # a runner may print a partial character
        except subprocess.TimeoutExpired as exc:
            raise RemoteCommandError(self.name, command, 124, f"killed after {timeout}s (timeout)") from exc
        if check and done.returncode != 0:
            raise RemoteCommandError(self.name, command, done.returncode, done.stderr + done.stdout)
        return Completed(done.stdout, done.stderr, done.returncode)

    def stage(self, local: Path, staging: str) -> str:
        return str(local)  # adb reads the file where it is

    def landing(self, local: Path, staging: str) -> str:
        return str(local)  # adb writes the file where it belongs

    def fetch(self, host_path: str, local: Path) -> None:
        pass  # already there

    def close(self) -> None:
        pass


class SshHost:
    """A lab machine with the phone attached, reached with Fabric (host keys verified as for boards)."""

    def __init__(self, device: SshDevice) -> None:
        self.device = device
        self.name = device.spec.host

    def run(self, command: str, *, timeout: int, check: bool = True) -> Completed:
        return self.device.run(command, timeout=timeout, check=check)

    def stage(self, local: Path, staging: str) -> str:
        self.device.run(f"mkdir -p {shlex.quote(staging)}")
        remote = f"{staging.rstrip('/')}/{local.name}"
        self.device.put(local, remote)
        return remote

    def landing(self, local: Path, staging: str) -> str:
        self.device.run(f"mkdir -p {shlex.quote(staging)}")
        return f"{staging.rstrip('/')}/{local.name}"

    def fetch(self, host_path: str, local: Path) -> None:
        self.device.get(host_path, local)

    def close(self) -> None:
        self.device.close()


def phone_workdir(spec: DeviceSpec) -> str:
    """The work folder on the phone: an absolute workdir as given, a relative one under /data/local/tmp."""
    return spec.workdir if spec.workdir.startswith("/") else f"{PHONE_ROOT}/{spec.workdir}"


def runner_tool(spec: DeviceSpec) -> str:
    """Which native tool the inventory's runner is: told by its file name."""
    name = PurePosixPath(spec.runner or "").name
    for stem in RUNNER_KINDS:
        if name.startswith(stem):
            return stem
    raise DeviceError(f"{spec.name}: runner '{spec.runner}' is none of ExecuTorch's executor_runner or llama_main "
                      "or LiteRT's benchmark_model; point 'runner' in the inventory at one of them (the file name "
                      "tells which)")


def runner_kind(spec: DeviceSpec) -> str:
    """The artifact format the runner executes."""
    return RUNNER_KINDS[runner_tool(spec)]


class AdbPhone:
    """``adb -s SERIAL ...`` run on the host; the phone's shell gets each value quoted."""

    def __init__(self, spec: DeviceSpec, host: LocalHost | SshHost) -> None:
        self.spec = spec
        self.host = host
        self.workdir = phone_workdir(spec)

    def adb(self, *args: str) -> str:
        """The host command line for one adb call (every argument quoted for the host's shell)."""
        return " ".join(shlex.quote(a) for a in (self.spec.adb, "-s", self.spec.serial or "", *args))

    def shell(self, command: str, *, timeout: int | None = None, check: bool = True) -> Completed:
        """Run ``command`` in the phone's shell. adb joins its arguments into one line for the phone's sh,
        so the command travels as one host-quoted argument and arrives exactly as written here."""
        try:
            return self.host.run(self.adb("shell", command), timeout=timeout or self.spec.timeout, check=check)
        except RemoteCommandError as exc:
            raise RemoteCommandError(self.spec.name, f"adb shell {command}", exc.exit_code, exc.output) from exc

    def push(self, local: Path, remote: str) -> None:
        on_host = self.host.stage(local, f"{self.spec.host_workdir}/staging")
        try:
            self.host.run(self.adb("push", on_host, remote), timeout=self.spec.timeout)
        except RemoteCommandError as exc:
            raise DeviceError(f"{self.spec.name}: adb push of {local.name} failed: {exc.output.strip()[-300:]}; "
                              "is the phone's storage full?") from exc

    def pull(self, remote: str, local: Path) -> None:
        landing = self.host.landing(local, f"{self.spec.host_workdir}/staging")
        self.host.run(self.adb("pull", remote, landing), timeout=self.spec.timeout)
        self.host.fetch(landing, local)

    def facts(self) -> dict[str, Any]:
        """Reachable, ABI, Android release, free bytes in the work folder, the runner present."""
        q = shlex.quote
        script = (f"mkdir -p {q(self.workdir)} && getprop ro.product.cpu.abi && getprop ro.build.version.release "
                  f"&& getprop ro.product.model && df -k {q(self.workdir)} && "
                  f"if [ -x {q(self.spec.runner or '')} ]; then echo runner-present; else echo runner-missing; fi")
        try:
            out = self.shell(script, timeout=60).stdout
        except RemoteCommandError as exc:
            raise ConnectError(f"{self.spec.name}: adb cannot reach phone {self.spec.serial} on {self.host.name}: "
                               f"{exc.output.strip()[-300:]}") from exc
        return parse_facts(out, self.spec)

    def hashes(self, paths: list[str]) -> dict[str, str]:
        listed = " ".join(map(shlex.quote, paths))
        out = self.shell(f"sha256sum {listed} 2>/dev/null || true", timeout=300).stdout
        found = {}
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                found[parts[1].strip()] = parts[0]
        return found


def parse_facts(text: str, spec: DeviceSpec) -> dict[str, Any]:
    """getprop's three values, then ``df -k`` (header, one row, possibly wrapped), then the runner check."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 6:
        raise DeviceError(f"{spec.name}: unexpected answer from the phone's shell: {text.strip()[:300]!r}")
    abi, release, model = lines[0], lines[1], lines[2]
    df_rows = lines[3:-1]
    fields = " ".join(df_rows[1:]).split()  # a long device name wraps the row onto two lines
    try:
        free_kb = int(fields[3])
    except (IndexError, ValueError) as exc:
        raise DeviceError(f"{spec.name}: cannot read free space from df: {' | '.join(df_rows)}") from exc
    kind = runner_kind(spec)
    runtimes = {f"{PurePosixPath(spec.runner or '').name}": "native"} if lines[-1] == "runner-present" else {}
    return {"arch": {"arm64-v8a": "aarch64", "armeabi-v7a": "armv7l", "x86_64": "x86_64"}.get(abi, abi),
            "abi": abi, "os": "Android", "release": release, "model": model, "free_bytes": free_kb * 1024,
            "runner": spec.runner, "runner_format": kind, "runtimes": runtimes}


# -- executor_runner ------------------------------------------------------------------------------

# ET_LOG lines: "I 00:00:01.234567 executorch:executor_runner.cpp:123] message"
_ET_LOG = re.compile(r"^[DIEF] (\d+):(\d+):(\d+)\.(\d+) executorch:[^\]]*\] (.*)$")


def executor_runner_command(runner: str, model: str, inputs: list[str], output_base: str | None,
                            executions: int, data: str | None = None) -> str:
    """``data``: the program's .ptd (constants it keeps outside itself), when it has one."""
    parts = [runner, f"--model_path={model}", f"--num_executions={executions}"]
    if data:
        parts.append(f"--data_path={data}")
    if inputs:
        parts.append(f"--inputs={','.join(inputs)}")
    if output_base:
        parts.append(f"--output_file={output_base}")
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class ExecutorRunnerTimes:
    load_ms: float | None  # from process start to "Method loaded." (ET_LOG timestamps)
    iterations_ms: list[float]


def parse_executor_runner(text: str) -> ExecutorRunnerTimes:
    load_ms, iterations = None, []
    for line in text.splitlines():
        match = _ET_LOG.match(line.strip())
        if not match:
            continue
        hours, minutes, seconds, micros, message = match.groups()
        stamp_ms = ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(micros) / 1000
        if message.startswith("Method loaded"):
            load_ms = stamp_ms
        iteration = re.match(r"Iteration \d+ of \d+: ([0-9.]+) ms", message)
        if iteration:
            iterations.append(float(iteration.group(1)))
    if not iterations:
        raise ValueError("executor_runner printed no 'Iteration i of N: X ms' lines (is it an ExecuTorch "
                         "executor_runner built with logging on?)")
    return ExecutorRunnerTimes(load_ms, iterations)


# -- benchmark_model -----------------------------------------------------------------------------

def benchmark_model_command(runner: str, graph: str, inputs: dict[str, tuple[str, tuple[int, ...]]],
                            output_file: str | None, runs: int, warmup: int) -> str:
    """``inputs``: name -> (file on the phone, shape), in the interpreter's input order."""
    parts = [runner, f"--graph={graph}", f"--num_runs={runs}", f"--warmup_runs={warmup}",
             "--report_peak_memory_footprint=true"]
    if inputs:
        parts += [f"--input_layer={','.join(inputs)}",
                  f"--input_layer_shape={':'.join(','.join(map(str, shape)) for _, shape in inputs.values())}",
                  f"--input_layer_value_files={','.join(f'{name}:{path}' for name, (path, _) in inputs.items())}"]
    if output_file:
        parts.append(f"--output_filepath={output_file}")
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class BenchmarkModelTimes:
    init_ms: float
    first_ms: float
    runs: dict[str, float]  # count, first, curr, min, max, avg, std (and median when printed), in ms
    peak_mb: float | None


def parse_benchmark_model(text: str) -> BenchmarkModelTimes:
    stats = [{k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line)}
             for line in text.splitlines() if re.search(r"\bcount=\d+ first=", line)]
    # Since TF 2.3: "Inference timings in us: Init: I, First inference: F, Warmup (avg): W, Inference (avg): A";
    # before: "Average inference timings in us: Warmup: W, Init: I, Inference: A" (no first inference).
    summary = re.search(r"Inference timings in us: Init: ([0-9.]+), First inference: ([0-9.]+)", text)
    older = re.search(r"Average inference timings in us: Warmup: ([0-9.]+), Init: ([0-9.]+)", text)
    if not stats or (summary is None and older is None):
        raise ValueError("benchmark_model printed no 'count=... avg=...' statistics or no 'Inference timings in us' "
                         f"line (did the model fail to load?): {text.strip()[-300:]}")
    regular = stats[-1]  # warm-up statistics come first, the timed runs last
    runs = {k: (v if k == "count" else v / 1000) for k, v in regular.items()}
    init_us, first_us = (summary.group(1), summary.group(2)) if summary else (older.group(2), stats[0]["first"])
    peak = re.search(r"Overall peak memory footprint \(MB\) via periodic monitoring: ([0-9.]+)", text)
    return BenchmarkModelTimes(float(init_us) / 1000, float(first_us) / 1000, runs,
                               float(peak.group(1)) if peak else None)


def latency_from_summary(runs: dict[str, float]) -> dict[str, float | None]:
    """benchmark_model prints min/avg/max/std (and a median in recent versions), not every run."""
    return {"min": runs.get("min"), "p50": runs.get("median"), "mean": runs.get("avg"), "p90": None, "p99": None,
            "max": runs.get("max"), "std": runs.get("std")}


# -- llama_main (language models) -----------------------------------------------------------------

def llama_main_command(runner: str, model: str, tokenizer: str, prompt_file: str, max_new_tokens: int, *,
                       warmup: bool = False, data: str | None = None) -> str:
    """Greedy generation of one prompt (read from a file: chat templates span lines and quotes). No
    --num_bos: the prompt text carries its BOS, which the runner's tokenizer reads as a special token."""
    parts = [runner, f"--model_path={model}", f"--tokenizer_path={tokenizer}", f"--prompt_file={prompt_file}",
             "--temperature=0", f"--max_new_tokens={max_new_tokens}"]
    if data:  # the program's .ptd
        parts.append(f"--data_paths={data}")
    if warmup:
        parts.append("--warmup")
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class LlamaMainRun:
    text: str  # what the model generated (the echoed prompt removed)
    stats: dict[str, Any]  # the PyTorchObserver report: token counts and millisecond timestamps
    peak_rss_mb: float | None  # from its "RSS after ...: X MiB" log lines, where the log reaches stderr


def parse_llama_main(stdout: str, stderr: str, prompt: str) -> LlamaMainRun:
    """TextLLMRunner prints the prompt, each generated piece as it comes, a newline, then
    ``PyTorchObserver {json}`` on stdout; its log goes to stderr (to logcat on a phone)."""
    marker = stdout.rfind("PyTorchObserver {")
    if marker < 0:
        raise ValueError("llama_main printed no 'PyTorchObserver {...}' report (did it fail to load the model or "
                         f"the tokenizer?): {(stdout + stderr).strip()[-300:]}")
    stats = json.loads(stdout[marker + len("PyTorchObserver "):].splitlines()[0])
    body = stdout[:marker]
    start = body.find(prompt)  # a warm-up run may have printed a newline first
    body = body[start + len(prompt):] if start >= 0 else body
    rss = [float(v) for v in re.findall(r"RSS after [^:\n]*: ([0-9.]+) MiB", stdout + stderr)]
    return LlamaMainRun(body[:-1] if body.endswith("\n") else body, stats, max(rss) if rss and max(rss) > 0 else None)


def printable(text: str) -> str:
    """The characters both sides surely print. llama_main drops every one-byte piece that is not printable
    ASCII (ExecuTorch's safe_printf), so a character split over byte tokens never reaches its output, and
    a partial character decodes as U+FFFD: generations are compared on their ASCII characters."""
    return "".join(c for c in text if c < "\x80")


def matched_tokens(decode: Any, expected: list[int], text: str) -> int:
    """How many of the expected tokens ``text`` reproduces before it first differs: the longest prefix of
    ``expected`` whose decoded text starts ``text`` (compared on their printable characters)."""
    seen = printable(text)
    return max((k for k in range(1, len(expected) + 1) if seen.startswith(printable(decode(expected[:k])))), default=0)


def measure_language_model(phone: AdbPhone, record: dict[str, Any], model_path: str, tokenizer_path: str,
                           golden: dict[str, np.ndarray], decode: Any, job: dict[str, Any],
                           local_dir: Path, data_path: str | None = None) -> dict[str, Any]:
    """Each fixed prompt through llama_main, greedily, as many tokens as the eager model's answer; timings
    from its report, the answers compared on the host with the eager model's and with the host's run."""
    runs, matches = [], []
    index = 0
    while f"prompt{index}" in golden:
        prompt_ids = [int(t) for t in golden[f"prompt{index}"]]
        expected = [int(t) for t in golden[f"greedy{index}"]]
        # The whole prompt as text, BOS and chat markers included: the runner's tokenizer reads special tokens in
        # the text (its --num_bos relies on a BOS the tokenizer file may not name), and the count is checked below.
        prompt = decode(prompt_ids)
        local = local_dir / f"prompt{index}.txt"
        local.write_text(prompt, encoding="utf-8")
        remote = f"{phone.workdir}/{job['run_id']}/{local.name}"
        phone.push(local, remote)
        done = phone.shell(llama_main_command(phone.spec.runner or "", model_path, tokenizer_path, remote,
                                              len(expected), warmup=job["warmup"] > 0, data=data_path))
        run = parse_llama_main(done.stdout, done.stderr, prompt)
        if run.stats.get("prompt_tokens") != len(prompt_ids):
            raise ValueError(f"llama_main read prompt {index} as {run.stats.get('prompt_tokens')} tokens, the host as "
                             f"{len(prompt_ids)}: the phone's tokenizer splits the chat template differently, so its "
                             "answers cannot be compared token by token")
        runs.append(run)
        matches.append(matched_tokens(decode, expected, run.text) / max(len(expected), 1))
        index += 1
    if not runs:
        raise ValueError("the golden file holds no prompts to generate from")
    texts = [r.text for r in runs]
    (local_dir / f"{record['name']}.generations.json").write_text(json.dumps(texts, indent=1))
    stats = [r.stats for r in runs]
    prefill_ms = sum(s["prompt_eval_end_ms"] - s["inference_start_ms"] for s in stats)
    decode_ms = sum(s["inference_end_ms"] - s["prompt_eval_end_ms"] for s in stats)
    generated = sum(s["generated_tokens"] for s in stats)
    step_ms = [(s["inference_end_ms"] - s["prompt_eval_end_ms"]) / s["generated_tokens"]
               for s in stats if s["generated_tokens"]]  # llama_main reports per prompt, not per step
    loads = sorted(s["model_load_end_ms"] - s["model_load_start_ms"] for s in stats)
    host_texts = record.get("generations") or []
    metrics = {"greedy_match": float(np.mean(matches))}
    if len(host_texts) == len(texts):
        # (at EOS the runner prints a newline of its own: trailing newlines do not count)
        same = [printable(a).rstrip("\n") == printable(b).rstrip("\n") for a, b in zip(texts, host_texts)]
        metrics["same_as_host"] = sum(same) / len(same)
    rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb]
    return {"kind": "language-model", "load_ms": float(loads[len(loads) // 2]), "iterations": generated,
            "ttft_ms": float(np.mean([s["first_token_ms"] - s["inference_start_ms"] for s in stats])),
            "prefill_tokens_per_s": 1000 * sum(s["prompt_tokens"] for s in stats) / prefill_ms if prefill_ms else None,
            "decode_tokens_per_s": 1000 * generated / decode_ms if decode_ms else None,
            "latency_ms": latency_from_summary({"min": min(step_ms), "avg": float(np.mean(step_ms)),
                                                "max": max(step_ms), "std": float(np.std(step_ms))})
            if step_ms else latency_from_summary({}),
            "peak_rss_mb": max(rss) if rss else None, "metrics": metrics, "generations": texts,
            "outputs_file": f"{record['name']}.generations.json", "samples_ms": []}


def host_agreement_check(metrics: dict[str, Any], record: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    """The phone must generate about as faithfully as the same artifact did on the host: its greedy match may
    trail the host's by ``tolerance`` (another CPU's kernels round differently and break near-ties)."""
    host = ((record.get("parity") or {}).get("metrics") or {}).get("greedy_match")
    if host is None or "greedy_match" not in metrics:
        return []
    required = max(host - tolerance, 0.0)
    return [{"metric": "greedy_match_vs_host", "measured": metrics["greedy_match"], "required": required,
             "passed": metrics["greedy_match"] >= required}]


# -- a run on one phone ---------------------------------------------------------------------------

def _raw_inputs(golden: dict[str, np.ndarray], names: list[str], signature: dict[str, Any], index: int,
                folder: Path) -> list[Path]:
    """Golden set ``index`` as raw files in the artifact's own input dtypes, one per input, in order."""
    files = []
    for name, wanted in zip(names, signature["inputs"]):
        path = folder / f"set{index}.{wanted['name']}.bin"
        np.ascontiguousarray(golden[f"set{index}.input.{name}"].astype(wanted["dtype"])).tofile(path)
        files.append(path)
    return files


def _split_outputs(blob: bytes, signature: dict[str, Any], expected: list[np.ndarray]) -> list[np.ndarray]:
    """benchmark_model writes every output tensor's bytes back to back, in the interpreter's order."""
    arrays, offset = [], 0
    for spec, want in zip(signature["outputs"], expected):
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(want.shape))
        arrays.append(np.frombuffer(blob, dtype, count, offset).reshape(want.shape))
        offset += count * dtype.itemsize
    if offset != len(blob):
        raise ValueError(f"benchmark_model wrote {len(blob)} output bytes, the golden outputs need {offset}")
    return arrays


def measure_artifact(phone: AdbPhone, record: dict[str, Any], model_path: str, job: dict[str, Any],
                     golden: dict[str, np.ndarray], local_dir: Path, data_path: str | None = None) -> dict[str, Any]:
    """Latency from the native runner's own timings, then golden replay with outputs pulled and compared here."""
    runner, signature, workdir = phone.spec.runner or "", record["signature"], phone.workdir
    per_set_inputs = []
    for index in range(job["golden_sets"]):
        remote_files = []
        for path in _raw_inputs(golden, job["inputs"], signature, index, local_dir):
            remote = f"{workdir}/{job['run_id']}/{path.name}"
            phone.push(path, remote)
            remote_files.append(remote)
        per_set_inputs.append(remote_files)
    shapes = [tuple(s["shape"]) for s in signature["inputs"]]
    measured: dict[str, Any] = {}
    if record["format"] == "pte":
        done = phone.shell(executor_runner_command(runner, model_path, per_set_inputs[0], None,
                                                   job["warmup"] + job["iterations"], data_path))
        times = parse_executor_runner(done.stdout + done.stderr)  # ET_LOG writes to stderr
        samples = times.iterations_ms[job["warmup"]:] or times.iterations_ms
        measured.update({"load_ms": times.load_ms, "first_inference_ms": times.iterations_ms[0],
                         "iterations": len(samples), "latency_ms": device_runner.latency_stats(samples),
                         "samples_ms": samples})
    else:
        inputs = {s["name"]: (f, shape) for s, f, shape in zip(signature["inputs"], per_set_inputs[0], shapes)}
        done = phone.shell(benchmark_model_command(runner, model_path, inputs, None, job["iterations"], job["warmup"]),
                           check=False)
        times = parse_benchmark_model(done.stdout + done.stderr)  # benchmark_model logs to stderr
        measured.update({"load_ms": times.init_ms, "first_inference_ms": times.first_ms,
                         "iterations": int(times.runs.get("count", 0)), "latency_ms": latency_from_summary(times.runs),
                         "peak_rss_mb": times.peak_mb, "samples_ms": []})
    def run_set(index: int, _inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One golden set on the phone (its inputs are already there as raw files), outputs pulled back."""
        expected = [golden[f"set{index}.output.{n}"] for n in job["outputs"]]
        out_base = f"{workdir}/{job['run_id']}/{record['name']}.set{index}.out"
        if record["format"] == "pte":
            phone.shell(executor_runner_command(runner, model_path, per_set_inputs[index], out_base, 1, data_path))
            actual = []
            for i, (want, spec) in enumerate(zip(expected, signature["outputs"])):
                local = local_dir / f"{record['name']}.set{index}.out-{i}.bin"
                phone.pull(f"{out_base}-{i}.bin", local)
                actual.append(np.fromfile(local, np.dtype(spec["dtype"])).reshape(want.shape))
            return actual
        inputs = {s["name"]: (f, shape) for s, f, shape in zip(signature["inputs"], per_set_inputs[index], shapes)}
        phone.shell(benchmark_model_command(runner, model_path, inputs, out_base, 1, 0))
        local = local_dir / f"{record['name']}.set{index}.out.bin"
        phone.pull(out_base, local)
        return _split_outputs(local.read_bytes(), signature, expected)

    metrics, outputs = device_runner.replay_golden(job, golden, run_set)
    np.savez(local_dir / f"{record['name']}.outputs.npz", **outputs)
    measured.update({"metrics": metrics, "outputs_file": f"{record['name']}.outputs.npz"})
    return measured


def plan(data: dict[str, Any], facts: dict[str, Any], spec: DeviceSpec) -> list[dict[str, Any]]:
    """The artifacts the phone's runner executes, or a DeviceError saying why none."""
    if not facts["runtimes"]:
        raise DeviceError(f"{spec.name}: no executable runner at {spec.runner} on the phone; adb push it there "
                          "and chmod +x it")
    language_model = data["golden"].get("kind") == "language-model"
    tool = runner_tool(spec)
    if language_model and tool != LM_RUNNER:
        raise DeviceError(f"{spec.name}: language models run in ExecuTorch's LLM runner; point 'runner' at its "
                          f"llama_main binary (this phone's runner is {tool})")
    if tool == LM_RUNNER and not language_model:
        raise DeviceError(f"{spec.name}: llama_main runs language models only; point 'runner' at ExecuTorch's "
                          "executor_runner for this export")
    runnable = [r for r in data["artifacts"] if r.get("status") in ("passed", "failed")
                and r["format"] == facts["runner_format"] and (language_model or r.get("signature"))]
    if not runnable:
        formats = sorted({r["format"] for r in data["artifacts"]})
        raise DeviceError(f"{spec.name}: its runner {PurePosixPath(spec.runner or '').name} runs "
                          f".{facts['runner_format']} artifacts; this export has {', '.join('.' + f for f in formats)}")
    return runnable


def run_phone(spec: DeviceSpec, export_folder: Path, data: dict[str, Any], run_folder: Path, settings: Any,
              host: LocalHost | SshHost, log: list[str]) -> dict[str, Any]:
    """One phone, start to end: check, push (skipping what it has), measure, pull, clean."""
    phone = AdbPhone(spec, host)
    q = shlex.quote
    facts = phone.facts()
    log.append(f"facts: {facts}")
    artifacts = plan(data, facts, spec)
    to_cache = {r["file"]: r["sha256"] for r in artifacts}
    to_cache.update(program_data_files(artifacts))
    language_model = data["golden"].get("kind") == "language-model"
    tokenizer = data.get("bundle", {}).get("tokenizer")
    if language_model:
        if not tokenizer or not (export_folder / tokenizer).is_file():
            raise DeviceError(f"{spec.name}: llama_main needs the bundle's tokenizer file, which {export_folder} lacks; "
                              "export again")
        to_cache[tokenizer] = files.sha256_of(export_folder / tokenizer)
    need = sum((export_folder / name).stat().st_size for name in to_cache)
    if facts["free_bytes"] < need * 1.1:
        raise DeviceError(f"{spec.name}: only {facts['free_bytes'] / 1e6:.1f} MB free in {phone.workdir} on the phone, "
                          f"the artifacts need {need / 1e6:.1f} MB")
    cache = f"{phone.workdir}/cache"
    run_id = f"run-{run_folder.name}"
    phone.shell(f"mkdir -p {q(cache)} {q(phone.workdir + '/' + run_id)}")
    remote = {name: f"{cache}/{digest}{Path(name).suffix}" for name, digest in to_cache.items()}
    have = phone.hashes(list(remote.values()))
    pushed, skipped = [], []
    for name, digest in to_cache.items():
        if have.get(remote[name]) == digest:
            skipped.append(name)
            continue
        phone.push(export_folder / name, remote[name])
        pushed.append(name)
    log.append(f"pushed {pushed}, already there {skipped}")
    golden = dict(np.load(export_folder / data["golden"]["file"]))
    model = data["model"]
    job = {"run_id": run_id, "inputs": [i["name"] for i in model["inputs"]], "outputs": model["outputs"],
           "logits_outputs": model.get("logits_outputs", []), "padding_mask": model.get("padding_mask"),
           "golden_sets": data["golden"]["sets"], "iterations": settings.iterations, "warmup": settings.warmup}
    local_dir = run_folder / f"{spec.name}.outputs"
    local_dir.mkdir(exist_ok=True)
    decode = _decoder(export_folder / tokenizer) if language_model else None
    results: dict[str, Any] = {}
    for record in artifacts:
        data_path = next((remote[name] for name in program_data_files([record])), None)
        try:
            if language_model:
                measured = measure_language_model(phone, record, remote[record["file"]], remote[tokenizer], golden,
                                                  decode, job, local_dir, data_path)
            else:
                measured = measure_artifact(phone, record, remote[record["file"]], job, golden, local_dir, data_path)
            measured["checks"] = device_runner.judge(measured["metrics"], record.get("thresholds", {}))
            if language_model:
                measured["checks"] += host_agreement_check(measured["metrics"], record, METRIC_TOLERANCE["greedy_match"])
            measured["passed"] = bool(measured["checks"]) and all(c["passed"] for c in measured["checks"])
        except (RemoteCommandError, ValueError) as exc:  # one artifact failing must not hide the others
            measured = {"error": str(exc), "passed": False}
        results[record["name"]] = measured
    if not settings.keep_remote:
        phone.shell(f"rm -rf {q(phone.workdir + '/' + run_id)}")
    return {"facts": facts, "runner_version": f"native:{PurePosixPath(spec.runner or '').name}",
            "artifacts": results, "pushed": pushed, "skipped": skipped}


def _decoder(tokenizer_file: Path) -> Any:
    """Token ids to text exactly as the bundle's tokenizer writes them (special tokens kept, as the runner prints)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)
