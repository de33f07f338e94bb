"""A stand-in for ExecuTorch's executor_runner binary, for tests only (no Android phone here).

It takes the real binary's flags (--model_path, --data_path, --inputs, --output_file, --num_executions) and prints
the real binary's log lines (ET_LOG's "I hh:mm:ss.us executorch:file:line] message" on stderr), but runs
the program with ExecuTorch's Python runtime: the artifact executed is the real one.
"""

import sys
import time

import numpy as np
import torch

STARTED = time.perf_counter()
SCALAR_TYPES = {1: np.int8, 3: np.int32, 4: np.int64, 6: np.float32, 5: np.float16}


def log(message, line=100):
    elapsed = time.perf_counter() - STARTED
    hours, rest = divmod(elapsed, 3600)
    minutes, seconds = divmod(rest, 60)
    print(f"I {int(hours):02d}:{int(minutes):02d}:{int(seconds):02d}.{int((seconds % 1) * 1e6):06d} "
          f"executorch:executor_runner.cpp:{line}] {message}", file=sys.stderr)


def main(argv):
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    for flag in flags:
        if flag not in ("model_path", "data_path", "inputs", "output_file", "num_executions", "cpu_threads", "method_name"):
            print(f"ERROR: unknown command line flag '{flag}'", file=sys.stderr)
            return 1
    from executorch.runtime import Runtime

    for extension in ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"):
        __import__(extension)
    program = Runtime.get().load_program(flags["model_path"], data_path=flags.get("data_path") or None)
    log(f"Model file {flags['model_path']} is loaded.")
    log("Using method forward")
    method = program.load_method("forward")
    log("Method loaded.")
    meta = method.metadata
    specs = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    if flags.get("inputs"):
        log("Loading inputs from input file(s).")
        arrays = [np.fromfile(path, SCALAR_TYPES[int(s.dtype())]).reshape(tuple(s.sizes()))
                  for path, s in zip(flags["inputs"].split(","), specs)]
    else:
        arrays = [np.ones(tuple(s.sizes()), SCALAR_TYPES[int(s.dtype())]) for s in specs]
    runs = int(flags.get("num_executions", 1))
    total = 0.0
    for i in range(runs):
        began = time.perf_counter()
        outputs = method.execute([torch.from_numpy(a.copy()) for a in arrays])
        elapsed = (time.perf_counter() - began) * 1000
        total += elapsed
        log(f"Iteration {i + 1} of {runs}: {elapsed:f} ms")
    log(f"Model executed successfully {runs} time(s) in {total:f} ms.")
    log(f"{len(outputs)} outputs: ")
    if flags.get("output_file"):
        for i, output in enumerate(outputs):
            name = f"{flags['output_file']}-{i}.bin"
            log(f"Writing output to file: {name}")
            np.ascontiguousarray(output.numpy()).tofile(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
