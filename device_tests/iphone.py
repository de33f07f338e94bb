"""An iPhone attached to a Mac: the Mac (reached over SSH like any mac device) builds and runs ExecuTorch's
Benchmark app on it with ``xcodebuild test``, and XCTest's measurements are read back from its output.

The Benchmark app (executorch/extension/benchmark/apple/Benchmark) bundles whatever is in its
``Resources`` folder and makes tests from it: for every .pte ``GenericTests`` times loading it and
running ``forward`` on random inputs; for a .pte whose name holds "llm" next to a ``tokenizer.json``,
``LLMTests`` generates 50 tokens from its own prompt with ExecuTorch's LLM runner and reports tokens/s.
So the iPhone gives latency, tokens/s and memory as ExecuTorch's own app sees them; it cannot give
correctness (the inputs are the app's, not the golden ones): the same artifact's outputs are checked on
the host at export and on a mac device without ``iphone``.

Everything edgeship writes on the Mac stays in the device's work folder: the artifacts (cache/), the
app's resources (iphone-resources/, which the app's Resources folder must be a link to: set up once),
Xcode's build folder (xcode/) and each run's result bundles (run-*/).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter import files
from exporter.errors import DeviceError
from exporter.manifest import program_data_files

from . import runner as device_runner
from .inventory import DeviceSpec
from .transport import RemoteCommandError, SshDevice, push, remote_path

RESOURCES = "iphone-resources"
PROJECT = "Benchmark.xcodeproj"
SCHEME = "Benchmark"
TEST_TARGET = "Tests"  # the app's XCTest bundle
LM_TESTS, TENSOR_TESTS = "LLMTests", "GenericTests"
CLOCK, MEMORY, TOKENS = "Clock Monotonic Time, s", "Memory Peak Physical, kB", "Tokens Per Second, t/s"
CORRECTNESS_NOTE = ("correctness is not measured on the iPhone: ExecuTorch's Benchmark app feeds its own inputs; "
                    "this artifact's outputs are checked at export and on a mac device")


# -- what the Mac says about the iPhone -------------------------------------------------------------

def parse_destinations(text: str) -> dict[str, dict[str, Any]]:
    """``xcodebuild -showdestinations``: one ``{ platform:iOS, arch:arm64, id:..., name:... }`` line per
    destination, under "Available destinations" or "Ineligible destinations" (then with an ``error:``)."""
    found: dict[str, dict[str, Any]] = {}
    eligible = True
    for line in text.splitlines():
        if "Ineligible destinations" in line:
            eligible = False
        elif "Available destinations" in line:
            eligible = True
        match = re.match(r"\s*\{ (.*) \}\s*$", line)
        if not match:
            continue
        # keys are single words; "name" and "error" come last and may hold commas and colons
        fields = dict(re.findall(r"(\w+):(.*?)(?=, \w+:|$)", match.group(1)))
        if "id" in fields:
            found[fields["id"]] = {**fields, "eligible": eligible}
    return found


def iphone_facts(mac: SshDevice, spec: DeviceSpec) -> dict[str, Any]:
    """Xcode present, the app's Resources linked into the work folder, the iPhone attached and eligible,
    free space in the work folder."""
    q = shlex.quote
    app = (spec.benchmark_app or "").rstrip("/")
    resources = remote_path(spec, RESOURCES)
    try:
        version = mac.run(f"{q(spec.xcodebuild)} -version", timeout=60).stdout.split("\n")[0].strip()
    except RemoteCommandError as exc:
        raise DeviceError(f"{spec.name}: no working xcodebuild on {spec.host} ({exc.output.strip()[-200:]}); install "
                          "Xcode and run `sudo xcode-select -s /Applications/Xcode.app`, or set 'xcodebuild'") from exc
    listing = mac.run(f"mkdir -p {q(resources)} {q(remote_path(spec, 'cache'))} && cd {q(resources)} && pwd -P && "
                      f"(cd {q(app + '/Resources')} 2>/dev/null && pwd -P || echo no-resources-folder) && "
                      f"ls -d {q(app + '/' + PROJECT)} 2>/dev/null || echo no-project; df -k {q(spec.workdir)}",
                      timeout=60).stdout.splitlines()
    ours, theirs, project = listing[0].strip(), listing[1].strip(), listing[2].strip()
    if project == "no-project":
        raise DeviceError(f"{spec.name}: {app} on {spec.host} has no {PROJECT}; set 'benchmark_app' to the folder "
                          "executorch/extension/benchmark/apple/Benchmark of an ExecuTorch checkout")
    if theirs != ours:
        raise DeviceError(f"{spec.name}: the Benchmark app's Resources folder ({app}/Resources -> {theirs}) is not "
                          f"edgeship's {resources}; edgeship writes only in its work folder. Link it once on the "
                          f"Mac: mv {q(app + '/Resources')} {q(app + '/Resources.orig')} && "
                          f"ln -s {q(resources)} {q(app + '/Resources')}")
    try:
        free_kb = int(" ".join(listing[4:]).split()[3])
    except (IndexError, ValueError) as exc:
        raise DeviceError(f"{spec.name}: cannot read free space from df: {' | '.join(listing[3:])}") from exc
    shown = mac.run(f"{q(spec.xcodebuild)} -showdestinations -project {q(app + '/' + PROJECT)} -scheme {SCHEME}",
                    timeout=300, check=False)
    phone = parse_destinations(shown.stdout).get(spec.iphone or "")
    if phone is None:
        raise DeviceError(f"{spec.name}: no iPhone {spec.iphone} attached to {spec.host} (xcodebuild lists none with "
                          "that id); plug it in, unlock it and trust the Mac")
    if not phone["eligible"] or phone.get("platform") != "iOS":
        raise DeviceError(f"{spec.name}: iPhone {spec.iphone} ({phone.get('name', '?')}) cannot run the Benchmark app: "
                          f"{phone.get('error') or phone.get('platform')}")
    return {"arch": phone.get("arch", "arm64"), "os": "iOS", "model": phone.get("name", ""), "xcode": version,
            "mac": spec.host, "free_bytes": free_kb * 1024, "runtimes": {"executorch-benchmark-app": app}}


# -- xcodebuild test --------------------------------------------------------------------------------

def xcodebuild_test_command(spec: DeviceSpec, test_class: str, result_bundle: str) -> str:
    """Build and run one test class of the Benchmark app on the iPhone. Parallel testing off: XCTest then
    prints its own log (measurements included) to xcodebuild's output instead of only the result bundle."""
    app = (spec.benchmark_app or "").rstrip("/")
    parts = [spec.xcodebuild, "test", "-project", f"{app}/{PROJECT}", "-scheme", SCHEME,
             "-destination", f"platform=iOS,id={spec.iphone}", f"-only-testing:{TEST_TARGET}/{test_class}",
             "-parallel-testing-enabled", "NO", "-derivedDataPath", remote_path(spec, "xcode"),
             "-resultBundlePath", result_bundle]
    if spec.team:
        parts += ["-allowProvisioningUpdates", f"DEVELOPMENT_TEAM={spec.team}"]
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class XCTestCase:
    name: str  # e.g. test_forward_model_pte_iOS_18_1_iPhone16_2
    status: str = "started"  # passed | failed | started (it never finished)
    measured: dict[str, list[float]] = field(default_factory=dict)  # "[Clock Monotonic Time, s]" -> values
    errors: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """load, forward or generate: the Benchmark app names its tests test_<kind>_<resources>_<device>."""
        return self.name.split("_")[1] if self.name.count("_") else self.name


_CASE = re.compile(r"Test [Cc]ase '-\[(\S+) (\w+)\]' (started|passed|failed)")
_MEASURED = re.compile(r"Test Case '-\[\S+ (\w+)\]' measured \[([^\]]+)\] average: [^,]*, relative standard "
                       r"deviation: [^,]*, values: \[([^\]]*)\]")
_ERROR = re.compile(r"error: -\[\S+ (\w+)\] : (.*)")


def parse_xctest(text: str) -> dict[str, XCTestCase]:
    """XCTest's log lines as xcodebuild prints them: started/passed/failed per test case, one "measured
    [Metric, unit] average: A, relative standard deviation: R%, values: [v1, v2, ...]" line per metric."""
    cases: dict[str, XCTestCase] = {}
    for line in text.splitlines():
        if (measured := _MEASURED.search(line)) is not None:
            case = cases.setdefault(measured.group(1), XCTestCase(measured.group(1)))
            case.measured[measured.group(2)] = [float(v) for v in measured.group(3).split(",") if v.strip()]
        elif (error := _ERROR.search(line)) is not None:
            cases.setdefault(error.group(1), XCTestCase(error.group(1))).errors.append(error.group(2).strip())
        elif (state := _CASE.search(line)) is not None:
            case = cases.setdefault(state.group(2), XCTestCase(state.group(2)))
            if state.group(3) != "started":
                case.status = state.group(3)
    return cases


def measurements(cases: dict[str, XCTestCase], language_model: bool) -> dict[str, Any]:
    """The run's numbers in the harness's terms. Tensor models: load (ms, the load test's mean), latency per
    forward from the forward test's 20 runs. Language models: tokens/s of whole generations (prompt
    included: the app times generate as one call), latency per generated token from each run's tokens/s."""
    by_kind = {case.kind: case for case in cases.values()}
    memory = [v for case in cases.values() for v in case.measured.get(MEMORY, [])]
    out: dict[str, Any] = {"peak_rss_mb": max(memory) / 1024 if memory else None, "samples_ms": []}
    if language_model:
        rates = by_kind.get("generate", XCTestCase("")).measured.get(TOKENS, [])
        if not rates:
            raise ValueError("the Benchmark app's LLM test reported no tokens/s (did the model or tokenizer fail to load?)")
        samples = [1000 / r for r in rates if r > 0]
        out.update({"kind": "language-model", "generate_tokens_per_s": sum(rates) / len(rates), "iterations": len(rates),
                    "latency_ms": device_runner.latency_stats(samples), "samples_ms": samples})
        return out
    load = by_kind.get("load", XCTestCase("")).measured.get(CLOCK, [])
    forward = by_kind.get("forward", XCTestCase("")).measured.get(CLOCK, [])
    if not forward:
        raise ValueError("the Benchmark app's forward test reported no timings (did the program fail to load?)")
    samples = [v * 1000 for v in forward]
    out.update({"load_ms": 1000 * sum(load) / len(load) if load else None, "iterations": len(samples),
                "latency_ms": device_runner.latency_stats(samples), "samples_ms": samples})
    return out


# -- a run on one iPhone ----------------------------------------------------------------------------

def plan(data: dict[str, Any], spec: DeviceSpec) -> list[dict[str, Any]]:
    """The .pte programs of the export: the only artifacts the Benchmark app runs."""
    programs = [r for r in data["artifacts"] if r["format"] == "pte" and r.get("status") in ("passed", "failed")]
    # The app loads each .pte alone (no data_path): a program with a .ptd beside it cannot run there.
    runnable = [r for r in programs if not program_data_files([r])]
    if programs and not runnable:
        raise DeviceError(f"{spec.name}: ExecuTorch's Benchmark app loads a .pte without its .ptd data file "
                          f"({', '.join(program_data_files(programs))}); export for iPhone with a target whose .pte "
                          "keeps its own embedding (embedding_quant = \"int8\"), e.g. a copy of targets/android.toml")
    if not runnable:
        formats = sorted({r["format"] for r in data["artifacts"]})
        raise DeviceError(f"{spec.name}: ExecuTorch's Benchmark app runs .pte programs; this export has "
                          f"{', '.join('.' + f for f in formats)} (a Core ML package is validated by a mac device "
                          "without 'iphone')")
    return runnable


def _resource_name(record: dict[str, Any], language_model: bool) -> str:
    """The app's LLM test takes .pte files whose name holds "llm"; its generic test takes every .pte."""
    stem = Path(record["file"]).stem
    return f"{stem}.pte" if not language_model or "llm" in stem.lower() else f"{stem}-llm.pte"


def run_iphone(spec: DeviceSpec, export_folder: Path, data: dict[str, Any], run_folder: Path, settings: Any,
               mac: SshDevice, log: list[str]) -> dict[str, Any]:
    """One iPhone, start to end: check, push to the Mac (skipping what it has), one ``xcodebuild test`` per
    artifact, the output kept and parsed, the run's folder cleaned."""
    q = shlex.quote
    facts = iphone_facts(mac, spec)
    log.append(f"facts: {facts}")
    artifacts = plan(data, spec)
    language_model = data["golden"].get("kind") == "language-model"
    to_cache = {r["file"]: r["sha256"] for r in artifacts}
    tokenizer = data.get("bundle", {}).get("tokenizer")
    if language_model:
        if not tokenizer or not (export_folder / tokenizer).is_file():
            raise DeviceError(f"{spec.name}: the Benchmark app's LLM test needs the bundle's tokenizer file, which "
                              f"{export_folder} lacks; export again")
        to_cache[tokenizer] = files.sha256_of(export_folder / tokenizer)
    need = sum((export_folder / name).stat().st_size for name in to_cache)
    if facts["free_bytes"] < need * 2.1:  # the cache, and Xcode's copy of the resources into the app
        raise DeviceError(f"{spec.name}: only {facts['free_bytes'] / 1e6:.1f} MB free in {spec.workdir} on the Mac, "
                          f"the artifacts need {need * 2 / 1e6:.1f} MB there (cache and app bundle)")
    cached = {name: remote_path(spec, "cache", f"{digest}{Path(name).suffix}") for name, digest in to_cache.items()}
    paths = " ".join(q(p) for p in cached.values())  # shasum on a Mac; sha256sum where perl's shasum is absent
    listed = mac.run(f"(shasum -a 256 {paths} || sha256sum {paths}) 2>/dev/null || true", timeout=300).stdout
    have = {path: digest for digest, path in (line.split(None, 1) for line in listed.splitlines() if " " in line)}
    pushed, skipped = [], []
    for name, digest in to_cache.items():
        if have.get(cached[name]) == digest:
            skipped.append(name)
            continue
        push(mac, export_folder / name, cached[name], run_folder)
        pushed.append(name)
    log.append(f"pushed {pushed}, already there {skipped}")
    run_dir = remote_path(spec, f"run-{run_folder.name}")
    resources = remote_path(spec, RESOURCES)
    local_dir = run_folder / f"{spec.name}.outputs"
    local_dir.mkdir(exist_ok=True)
    mac.run(f"mkdir -p {q(run_dir)}")
    results: dict[str, Any] = {}
    for record in artifacts:
        try:
            # only this artifact in the app's resources: one build, one test class, numbers that are its own
            staged = [f"ln -f {q(cached[record['file']])} {q(resources + '/' + _resource_name(record, language_model))}"]
            if language_model:
                staged.append(f"ln -f {q(cached[tokenizer])} {q(resources + '/tokenizer.json')}")
            mac.run(f"rm -rf {q(resources)} && mkdir -p {q(resources)} && " + " && ".join(staged))
            test_class = LM_TESTS if language_model else TENSOR_TESTS
            done = mac.run(xcodebuild_test_command(spec, test_class, f"{run_dir}/{record['name']}.xcresult"),
                           check=False)
            output = done.stdout + done.stderr
            (local_dir / f"{record['name']}.xcodebuild.log").write_text(output)
            cases = parse_xctest(output)
            if not cases:
                raise ValueError(f"xcodebuild ran no {test_class} test (exit {done.exit_code}): "
                                 f"{' | '.join(output.strip().splitlines()[-4:])[-400:]}")
            failed = [c for c in cases.values() if c.status != "passed"]
            if failed:
                raise ValueError("; ".join(f"{c.name} {'failed' if c.status == 'failed' else 'never finished'}: "
                                           f"{' '.join(c.errors)[:300] or output.strip().splitlines()[-1][-300:]}"
                                           for c in failed))
            measured = measurements(cases, language_model)
            # The app's own assertions (the program loads, forward or generate returns Ok) are the checks here.
            measured["metrics"] = {"benchmark_tests_passed": 1.0}
            measured["checks"] = [{"metric": "benchmark_tests_passed", "measured": 1.0, "required": 1.0, "passed": True}]
            measured["note"] = CORRECTNESS_NOTE
            measured["passed"] = True
        except (RemoteCommandError, ValueError) as exc:  # one artifact failing must not hide the others
            measured = {"error": str(exc), "passed": False}
        results[record["name"]] = measured
    if not settings.keep_remote:
        mac.run(f"rm -rf {q(run_dir)} {q(resources)} && mkdir -p {q(resources)}")
    return {"facts": facts, "runner_version": f"executorch-benchmark-app ({facts['xcode']})", "artifacts": results,
            "pushed": pushed, "skipped": skipped}
