"""A stand-in for a Mac's xcodebuild driving an attached iPhone, for tests only (no Mac or iPhone here).

It answers the three calls the harness makes with the real tool's output formats: ``-version``,
``-showdestinations`` (the "{ platform:iOS, arch:arm64, id:..., name:... }" lines, eligible or not) and
``test`` of ExecuTorch's Benchmark app, for which it does what the build does with the app's resources
(copies the Resources folder, through its link, into the test bundle under -derivedDataPath, and writes
the result bundle) and then what the app's GenericTests and LLMTests do, with ExecuTorch's Python runtime
on the real artifacts, printing XCTest's own log lines: "Test Case '-[Class test]' started/passed/failed",
"... measured [Clock Monotonic Time, s] average: A, relative standard deviation: R%, values: [...]".

The iPhones it "sees" come from the JSON file named by $FAKE_IPHONES: {udid: {"name": ..., "error": ...}};
an entry with an "error" is listed as ineligible, as a locked or untrusted iPhone is.
"""

import json
import os
import re
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

DEVICE_INFO = "iOS_18_1_iPhone16_2"  # what the app's DynamicTestCase appends: system name, version, machine
SCALAR_TYPES = {1: "int8", 3: "int32", 4: "int64", 6: "float32", 5: "float16"}


def iphones():
    return json.loads(Path(os.environ["FAKE_IPHONES"]).read_text())


def show_destinations(args):
    print('\tAvailable destinations for the "Benchmark" scheme:')
    print("\t\t{ platform:macOS, arch:arm64, variant:Designed for [iPad,iPhone], id:00006001-001C30E23A42801E, "
          "name:My Mac }")
    listed = iphones()
    for udid, phone in listed.items():
        if not phone.get("error"):
            print(f"\t\t{{ platform:iOS, arch:arm64, id:{udid}, name:{phone['name']} }}")
    print("\t\t{ platform:iOS Simulator, id:5A1C3B07-7C8D-4F5E-9A6B-2C3D4E5F6A7B, OS:18.1, name:iPhone 16 }")
    print()
    print('\tIneligible destinations for the "Benchmark" scheme:')
    print("\t\t{ platform:iOS, id:dvtdevice-DVTiPhonePlaceholder-iphoneos:placeholder, name:Any iOS Device, "
          "error:iOS 18.1 is not installed. To use with Xcode, first download and install the platform }")
    for udid, phone in listed.items():
        if phone.get("error"):
            print(f"\t\t{{ platform:iOS, arch:arm64, id:{udid}, name:{phone['name']}, error:{phone['error']} }}")
    return 0


def clean(name):
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def measured(source, line, case, label, values, metric_id):
    mean = statistics.fmean(values)
    rsd = statistics.pstdev(values) / mean * 100 if mean else 0.0
    print(f"{source}:{line}: Test Case '-[{case}]' measured [{label}] average: {mean:.3f}, relative standard "
          f"deviation: {rsd:.3f}%, values: [{', '.join(f'{v:.6f}' for v in values)}], performanceMetricID:"
          f"{metric_id}, baselineName: \"\", baselineAverage: , polarity: prefers smaller, maxPercentRegression: "
          "10.000%, maxPercentRelativeStandardDeviation: 10.000%, maxRegression: 0.100, maxStandardDeviation: 0.100")


def peak_kb():
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def generic_tests(resources, source):
    """GenericTests: per .pte, load (5 measured loads) and forward (20 measured runs on random inputs)."""
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    for extension in ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"):
        __import__(extension)
    runtime = Runtime.get()
    results = []
    for model in sorted(resources.glob("*.pte")):
        case = f"GenericTests test_load_{clean(model.name)}_{DEVICE_INFO}"
        print(f"Test Case '-[{case}]' started.")
        began = time.perf_counter()
        try:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                runtime.load_program(str(model)).load_method("forward")
                times.append(time.perf_counter() - start)
        except RuntimeError:  # ExecuTorch's loader raises it for a program it cannot load
            print(f"{source}:52: error: -[{case}] : ((Module(modelPath.UTF8String).load_forward()) equal to "
                  "(Error::Ok)) failed: (\"34\") is not equal to (\"0\")")
            print(f"Test Case '-[{case}]' failed ({time.perf_counter() - began:.3f} seconds).")
            results.append(False)
            continue
        measured(source, 52, case, "Clock Monotonic Time, s", times, "com.apple.dt.XCTMetric_Clock.time.monotonic")
        measured(source, 52, case, "Memory Peak Physical, kB", [peak_kb()] * 5, "com.apple.dt.XCTMetric_Memory.physical_peak")
        print(f"Test Case '-[{case}]' passed ({time.perf_counter() - began:.3f} seconds).")
        results.append(True)

        case = f"GenericTests test_forward_{clean(model.name)}_{DEVICE_INFO}"
        print(f"Test Case '-[{case}]' started.")
        began = time.perf_counter()
        method = runtime.load_program(str(model)).load_method("forward")
        meta = method.metadata
        inputs = []
        for i in range(meta.num_inputs()):
            spec = meta.input_tensor_meta(i)
            inputs.append(torch.from_numpy(np.random.rand(*spec.sizes()).astype(SCALAR_TYPES[int(spec.dtype())])))
        times = []
        for _ in range(20):
            start = time.perf_counter()
            method.execute(inputs)
            times.append(time.perf_counter() - start)
        measured(source, 98, case, "Clock Monotonic Time, s", times, "com.apple.dt.XCTMetric_Clock.time.monotonic")
        measured(source, 98, case, "Memory Peak Physical, kB", [peak_kb()] * 20, "com.apple.dt.XCTMetric_Memory.physical_peak")
        print(f"Test Case '-[{case}]' passed ({time.perf_counter() - began:.3f} seconds).")
        results.append(True)
    return results


def llm_tests(resources, source):
    """LLMTests: a .pte named *llm* with a tokenizer file, 5 measured generations of 50 tokens from the app's
    own prompt, through ExecuTorch's LLM runner."""
    for extension in ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"):
        __import__(extension)
    from executorch.extension.llm.runner._llm_runner import GenerationConfig, TextLLMRunner

    tokenizers = [p for p in resources.iterdir() if p.name in ("tokenizer.bin", "tokenizer.model", "tokenizer.json")]
    results = []
    for model in sorted(p for p in resources.glob("*.pte") if "llm" in p.name.lower()):
        for tokenizer in tokenizers:
            case = f"LLMTests test_generate_{clean(model.name)}_{clean(tokenizer.name)}_{DEVICE_INFO}"
            print(f"Test Case '-[{case}]' started.")
            began = time.perf_counter()
            runner = TextLLMRunner(str(model), str(tokenizer))
            rates, times = [], []
            for _ in range(5):
                reports = []
                config = GenerationConfig()
                config.seq_len = 50
                start = time.perf_counter()
                # tokens counted from the runner's report: the Python binding cannot hand over a piece that
                # is a partial UTF-8 character, which the app's callback receives as bytes
                runner.generate("Once upon a time", config, None, lambda stats: reports.append(stats.to_json_string()))
                elapsed = time.perf_counter() - start
                runner.reset()
                rates.append(json.loads(reports[-1])["generated_tokens"] / elapsed)
                times.append(elapsed)
            measured(source, 97, case, "Tokens Per Second, t/s", rates, "TokensPerSecondMetric")
            measured(source, 97, case, "Clock Monotonic Time, s", times, "com.apple.dt.XCTMetric_Clock.time.monotonic")
            measured(source, 97, case, "Memory Peak Physical, kB", [peak_kb()] * 5, "com.apple.dt.XCTMetric_Memory.physical_peak")
            print(f"Test Case '-[{case}]' passed ({time.perf_counter() - began:.3f} seconds).")
            results.append(True)
    return results


def test(args):
    options = {}
    rest = iter(args)
    for arg in rest:
        if arg.startswith("-only-testing:"):
            options["only"] = arg.split(":", 1)[1]
        elif arg in ("-project", "-scheme", "-destination", "-derivedDataPath", "-resultBundlePath",
                     "-parallel-testing-enabled"):
            options[arg] = next(rest)
        elif arg in ("test", "-allowProvisioningUpdates") or arg.startswith("DEVELOPMENT_TEAM="):
            continue
        else:
            print(f"xcodebuild: error: invalid option '{arg}'", file=sys.stderr)
            return 64
    udid = dict(p.split("=", 1) for p in options["-destination"].split(","))["id"]
    phone = iphones().get(udid)
    if phone is None or phone.get("error"):
        print("xcodebuild: error: Unable to find a destination matching the provided destination specifier:\n"
              f"\t\t{{ platform:iOS, id:{udid} }}", file=sys.stderr)
        return 70
    bundle = Path(options["-resultBundlePath"])
    if bundle.exists():
        print(f"xcodebuild: error: Existing file at -resultBundlePath \"{bundle}\"", file=sys.stderr)
        return 64
    app = Path(options["-project"]).parent
    products = Path(options["-derivedDataPath"]) / "Build" / "Products" / "Debug-iphoneos"
    copied = products / "Benchmark.app" / "PlugIns" / "Tests.xctest" / "Resources"
    shutil.rmtree(copied, ignore_errors=True)
    shutil.copytree(app / "Resources", copied)  # Xcode's resource copy follows the folder's link
    print("Testing started")
    _, test_class = options["only"].split("/")
    source = app / "Tests" / ("LLM/LLMTests.mm" if test_class == "LLMTests" else f"{test_class}.mm")
    print(f"Test Suite '{test_class}' started at 2026-11-24 10:00:00.000.")
    began = time.perf_counter()
    results = (llm_tests if test_class == "LLMTests" else generic_tests)(copied, source)
    failures = results.count(False)
    print(f"Test Suite '{test_class}' {'failed' if failures else 'passed'} at 2026-11-24 10:00:09.000.")
    print(f"\t Executed {len(results)} tests, with {failures} failures (0 unexpected) in "
          f"{time.perf_counter() - began:.3f} ({time.perf_counter() - began:.3f}) seconds")
    bundle.mkdir(parents=True)
    (bundle / "Info.plist").write_text("<plist/>")
    print("** TEST FAILED **" if failures else "** TEST SUCCEEDED **")
    return 65 if failures else 0


def main(argv):
    if argv == ["-version"]:
        print("Xcode 16.1\nBuild version 16B40")
        return 0
    if "-showdestinations" in argv:
        return show_destinations(argv)
    if argv and argv[0] == "test":
        return test(argv)
    print(f"xcodebuild: error: unsupported call {argv}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
