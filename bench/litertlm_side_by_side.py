"""Two .litertlm bundles side by side in LiteRT-LM's engine (run with .venv-litertlm/bin/python):
each measurement in a fresh process, bundles alternating, 5 rounds, medians; with LiteRT-LM's default
CPU settings and a 21-token prefill (how LiteRT-LM's own benchmark is usually quoted), then with 2 threads.

    .venv-litertlm/bin/python bench/litertlm_side_by_side.py A.litertlm B.litertlm

Measured (docs/measurements.md "The .litertlm in LiteRT-LM against litert-torch's own bundle"): edgeship's android bundle and litert-torch's own
export_hf bundle of SmolLM2-135M decode within 5% of each other.
"""

import json
import statistics
import subprocess
import sys

_ONE_RUN = """
import json, sys
import litert_lm
cpu = litert_lm.interfaces.CPU() if sys.argv[2] == "default" else litert_lm.interfaces.CPU(thread_count=int(sys.argv[2]))
info = litert_lm.Benchmark(model_path=sys.argv[1], backend=cpu, prefill_tokens=int(sys.argv[3]), decode_tokens=64).run()
print(json.dumps([info.last_prefill_tokens_per_second, info.last_decode_tokens_per_second]))
"""


def main(bundles: list[str], rounds: int = 5) -> None:
    for threads, prefill in (("default", "21"), ("2", "30")):
        results: dict[str, list[list[float]]] = {b: [] for b in bundles}
        for _ in range(rounds):
            for bundle in bundles:
                done = subprocess.run([sys.executable, "-c", _ONE_RUN, bundle, threads, prefill],
                                      capture_output=True, text=True, check=True)
                results[bundle].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for bundle, runs in results.items():
            print(f"threads={threads} prefill={prefill} {bundle}: prefill "
                  f"{statistics.median(r[0] for r in runs):.0f} tok/s, decode {statistics.median(r[1] for r in runs):.0f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1:])
