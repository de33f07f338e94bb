"""Wall time and peak memory of one export, counting every process it starts.

`/usr/bin/time -v` reports the largest single process; an export runs litert-torch in a child while the
parent holds the model, so the machine needs their sum. This samples the whole process tree twice a
second: the sum of resident sets (shared pages counted in each process) and of proportional sets
(PSS: shared pages split between the processes sharing them, the honest total), and the peak resident
set of edgeship's own process and of its largest child. Any `edgeship export` flags pass through;
`--timeline FILE` (this script's own) also writes every sample, (seconds, edgeship's PSS, the children's
PSS) in GiB, to see which phases overlap at the peak.

    .venv/bin/python bench/export_footprint.py --target android --output /tmp/footprint [--sequential]

Measured (docs/measurements.md "Export time and memory"): default 3 min 51 s, 3.77 GiB tree PSS, the
largest process 2.96 GiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(processes: list[psutil.Process]) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(sum of RSS, sum of PSS, (RSS, PSS) by pid) in bytes over the processes still alive."""
    rss = pss = 0
    by_pid: dict[int, tuple[int, int]] = {}
    for process in processes:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss, by_pid[process.pid] = rss + info.rss, pss + info.pss, (info.rss, info.pss)
    return rss, pss, by_pid


def main(argv: list[str]) -> int:
    timeline_path = None
    if "--timeline" in argv:
        at = argv.index("--timeline")
        timeline_path, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    command = [str(Path(sys.executable).parent / "edgeship"), "export", *argv]
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = peak_parent = peak_other = 0
    timeline = []
    while child.poll() is None:
        rss, pss, by_pid = sample(tree(root))
        pss_by_pid = {pid: value for pid, (_, value) in by_pid.items()}
        parent_pss = pss_by_pid.pop(child.pid, 0)
        timeline.append((round(time.perf_counter() - began, 1), round(parent_pss / 2**30, 3),
                         round(sum(pss_by_pid.values()) / 2**30, 3)))
        by_pid = {pid: value for pid, (value, _) in by_pid.items()}
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        peak_parent = max(peak_parent, by_pid.pop(child.pid, 0))
        peak_other = max(peak_other, *by_pid.values(), 0)
        time.sleep(0.5)
    wall = time.perf_counter() - began
    stderr = child.stderr.read() if child.stderr else ""
    steps = [line for line in stderr.splitlines() if line.startswith("[") and " done in " in line]
    result = {"command": " ".join(command[1:]), "exit": child.returncode, "wall_s": round(wall, 1),
              "peak_tree_rss_gib": round(peak_rss / 2**30, 2), "peak_tree_pss_gib": round(peak_pss / 2**30, 2),
              "peak_single_process_rss_gib": round(max(peak_parent, peak_other) / 2**30, 2),
              "peak_edgeship_process_rss_gib": round(peak_parent / 2**30, 2),
              "peak_child_process_rss_gib": round(peak_other / 2**30, 2), "steps": steps}
    if timeline_path is not None:
        timeline_path.write_text(json.dumps({"columns": ["seconds", "edgeship_pss_gib", "children_pss_gib"],
                                             "steps": steps, "samples": timeline}))
    print(json.dumps(result, indent=1))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
