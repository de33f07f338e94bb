"""A stand-in for LiteRT's benchmark_model binary, for tests only (no Android phone here).

It takes the real binary's flags (--graph, --num_runs, --warmup_runs, --input_layer, --input_layer_shape,
--input_layer_value_files, --output_filepath) and prints the real binary's "INFO:" lines on stderr, but
runs the model with LiteRT's Python interpreter: the artifact executed is the real one.
"""

import os
import resource
import statistics
import sys
import time

import numpy as np


def info(message):
    print(f"INFO: {message}", file=sys.stderr)


def stats_line(samples_us):
    ordered = sorted(samples_us)
    mean = sum(ordered) / len(ordered)
    std = (sum((s - mean) ** 2 for s in ordered) / len(ordered)) ** 0.5
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (f"count={len(ordered)} first={int(samples_us[0])} curr={int(samples_us[-1])} min={int(ordered[0])} "
            f"max={int(ordered[-1])} avg={mean:g} std={int(std)} p5={int(pick(0.05))} "
            f"median={int(statistics.median(ordered))} p95={int(pick(0.95))}")


def main(argv):
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    from ai_edge_litert.interpreter import Interpreter

    info("Log parameter values verbosely: [0]")
    info(f"Graph: [{flags['graph']}]")
    began = time.perf_counter()
    interpreter = Interpreter(model_path=flags["graph"])
    interpreter.allocate_tensors()
    init_us = (time.perf_counter() - began) * 1e6
    info(f"The input model file size (MB): {os.path.getsize(flags['graph']) / 1e6:g}")
    info(f"Initialized session in {init_us / 1e3:g}ms.")
    details = interpreter.get_input_details()
    files = dict(item.split(":", 1) for item in flags.get("input_layer_value_files", "").split(",") if item)
    names = flags.get("input_layer", "").split(",") if flags.get("input_layer") else []
    for index, detail in enumerate(details):
        if index < len(names) and names[index] in files:
            value = np.fromfile(files[names[index]], detail["dtype"]).reshape(detail["shape"])
        else:
            value = np.random.default_rng(0).random(detail["shape"]).astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], value)

    def timed(count):
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            interpreter.invoke()
            samples.append((time.perf_counter() - start) * 1e6)
        return samples

    warmup_runs, runs = max(1, int(flags.get("warmup_runs", 1))), int(flags.get("num_runs", 50))
    info(f"Running benchmark for at least {warmup_runs} iterations and at least 0.5 seconds but terminate if "
         "exceeding 150 seconds.")
    warmup = timed(warmup_runs)
    info(stats_line(warmup) + "\n")
    info(f"Running benchmark for at least {runs} iterations and at least 1 seconds but terminate if exceeding "
         "150 seconds.")
    regular = timed(max(runs, 1))
    info(stats_line(regular) + "\n")
    info(f"Inference timings in us: Init: {int(init_us)}, First inference: {int(warmup[0])}, Warmup (avg): "
         f"{sum(warmup) / len(warmup):g}, Inference (avg): {sum(regular) / len(regular):g}")
    if flags.get("report_peak_memory_footprint") == "true":
        info("Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to "
             "the actual memory footprint of the model at runtime. Take the information at your discretion.")
        info(f"Overall peak memory footprint (MB) via periodic monitoring: "
             f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:g}")
    if flags.get("output_filepath"):
        with open(flags["output_filepath"], "wb") as handle:
            for detail in interpreter.get_output_details():
                handle.write(np.ascontiguousarray(interpreter.get_tensor(detail["index"])).tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
