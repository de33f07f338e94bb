"""Language-model .pte files of several export folders in ExecuTorch's own TextLLMRunner, side by side:
each run in a fresh process, the programs alternating round-robin, medians reported. For comparing
targets (android-int8 against android) and the optimum-executorch anchor in one run, which ``make bench``
(one export folder) cannot. Usage:

    .venv/bin/python bench/pte_side_by_side.py ROUNDS PROGRAM.pte [PROGRAM.pte ...]

The first program's folder must hold the tokenizer (an export folder does), which every program uses;
a program's .ptd of the same stem is loaded with it. The prompt and token counts are `make bench`'s.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from exporter.bench import run_engine, prompt_ids


def main(rounds: int, programs: list[Path]) -> None:
    from transformers import AutoTokenizer

    tokens = len(prompt_ids(AutoTokenizer.from_pretrained(str(programs[0].parent))))
    samples: dict[Path, list[dict]] = {p: [] for p in programs}
    for _ in range(rounds):
        for program in programs:
            samples[program].append(run_engine("anchor-runner", programs[0].parent, str(program), tokens))
    for program in programs:
        good = [s for s in samples[program] if "error" not in s]
        size = program.stat().st_size + (program.with_suffix(".ptd").stat().st_size if program.with_suffix(".ptd").exists() else 0)
        row = {"program": str(program), "runs": len(good), "size_mb": round(size / 1e6, 1),
               **{k: round(statistics.median(s[k] for s in good), 1) for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")}} \
            if good else {"program": str(program), "error": samples[program][0].get("error")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
