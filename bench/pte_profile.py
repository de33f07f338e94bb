"""Where a language-model .pte spends a decode step: ExecuTorch's ETDump of STEPS decode steps, summed per
event kind (each delegate call, each XNNPACK operator inside one, each portable operator), medians over
the steps. Usage:

    .venv/bin/python bench/pte_profile.py PROGRAM.pte [STEPS]

The program's .ptd of the same stem is loaded with it. Profiling adds a few microseconds per event, so a
program with more events looks slower here than it runs; time programs against each other with
bench/pte_side_by_side.py and use this for where the time goes inside one.
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
from pathlib import Path

import torch

PROMPT = 8  # tokens of the prefill that fills the cache before the profiled decode steps


def record(program: Path, steps: int, etdump: Path) -> None:
    from executorch.extension.pybindings import portable_lib

    from exporter.formats.pte import load_runtime_extensions

    load_runtime_extensions()
    data = program.with_suffix(".ptd")
    module = portable_lib._load_for_executorch(str(program), str(data) if data.exists() else None, enable_etdump=True)
    module.forward([torch.arange(1, PROMPT + 1).reshape(1, PROMPT), torch.tensor([0])])
    for step in range(steps):
        module.forward([torch.tensor([[100 + step]]), torch.tensor([PROMPT + step])])
    module.write_etdump_result_to_file(str(etdump))


def per_kind(etdump: Path) -> tuple[dict[str, float], collections.Counter]:
    """Milliseconds per decode step and events per step, by event name (the prefill's run left out)."""
    from executorch.devtools import Inspector

    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for block in Inspector(etdump_path=str(etdump)).event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is not None:
                totals[event.name] += statistics.median(event.perf_data.raw[1:])
                counts[event.name] += 1
    return totals, counts


def main(program: Path, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        etdump = Path(folder) / "profile.etdp"
        record(program, steps, etdump)
        totals, counts = per_kind(etdump)
    print(f"{program}: {steps} decode steps, ms per step by event (DELEGATE_CALL includes the XNNPACK "
          "operators listed under it; OPERATOR_CALL wraps each portable operator)")
    for name, ms in sorted(totals.items(), key=lambda item: -item[1]):
        if ms >= 0.005:
            print(f"{ms:8.3f} ms  {counts[name]:5d} x  {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20)
