"""Wall time and peak memory of one export, counting every process it starts, and the peak of each phase.

`/usr/bin/time -v` reports the largest single process; an export runs litert-torch in a child while the
parent holds the model, so the machine needs their sum. This samples the whole process tree twice a
second: the sum of resident sets (shared pages counted in each process) and of proportional sets
(PSS: shared pages split between the processes sharing them, the honest total), and the peak resident
set of edgeship's own process and of its largest child. The export's stage lines ("loading ...",
"eager fp32 reference ...", "<artifact>: ...") are read as they come, so each phase gets its own seconds
and tree PSS peak, and the cores the tree kept busy on average while it ran (2.0 on this machine: no core
idle). Any `edgeship export` flags pass through; `--timeline FILE` (this script's own) also writes every
sample, (seconds, edgeship's PSS, the children's PSS in GiB, edgeship's and the children's busy cores since
the sample before), to see which phases overlap and where a core idles.

    .venv/bin/python bench/export_footprint.py --target android --output /tmp/footprint [--sequential]

Measured (docs/measurements.md "Export time and memory"): default 3 min 51 s, 3.77 GiB tree PSS, the
largest process 2.96 GiB.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

GIB = 2**30
STAGE = re.compile(r"^\[\s*[\d.]+s\] (?P<name>.+?)(?P<end> \.\.\.| done in (?P<seconds>[\d.]+)s)$")


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(processes: list[psutil.Process]) -> tuple[int, int, dict[int, tuple[int, int, float]]]:
    """(sum of RSS, sum of PSS, (RSS, PSS, CPU seconds so far) by pid) in bytes over the processes still alive."""
    rss = pss = 0
    by_pid: dict[int, tuple[int, int, float]] = {}
    for process in processes:
        try:
            info = process.memory_full_info()
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + info.rss, pss + info.pss
        by_pid[process.pid] = (info.rss, info.pss, times.user + times.system)
    return rss, pss, by_pid


def phases(lines: list[tuple[float, str]], samples: list[tuple[float, float]],
           busy: list[tuple[float, float]] | None = None) -> list[dict[str, Any]]:
    """Each stage the export reported (its start and done lines, stamped on arrival) with its seconds,
    the largest tree PSS sampled while it ran and the cores the tree kept busy on average meanwhile
    (``busy``: (seconds, busy cores since the sample before))."""
    started: dict[str, float] = {}
    found = []
    for at, line in lines:
        match = STAGE.match(line)
        if not match:
            continue
        if match["end"] == " ...":
            started[match["name"]] = at
        elif match["name"] in started:
            began = started.pop(match["name"])
            inside = [pss for t, pss in samples if began <= t <= at] or [0.0]
            cores = [c for t, c in busy or [] if began < t <= at]
            found.append({"phase": match["name"], "seconds": float(match["seconds"]),
                          "peak_tree_pss_gib": round(max(inside), 2),
                          **({"busy_cores": round(sum(cores) / len(cores), 2)} if cores else {})})
    return found


def measure(export_args: list[str], executable: str | None = None) -> dict[str, Any]:
    """Run ``edgeship export <export_args>`` and measure it (see the module's docstring)."""
    command = [executable or str(Path(sys.executable).parent / "edgeship"), "export", *export_args]
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read_stages() -> None:
        for line in child.stderr:
            lines.append((time.perf_counter() - began, line.rstrip("\n")))

    reader = threading.Thread(target=read_stages, daemon=True)
    reader.start()
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = peak_parent = peak_other = 0
    timeline, tree_pss, tree_busy = [], [], []
    cpu_before: dict[int, float] = {}
    then = 0.0
    while child.poll() is None:
        rss, pss, by_pid = sample(tree(root))
        now = round(time.perf_counter() - began, 1)
        pss_by_pid = {pid: value for pid, (_, value, _) in by_pid.items()}
        parent_pss = pss_by_pid.pop(child.pid, 0)
        # CPU seconds since the sample before, per process (a process new since then counts from 0)
        spent = {pid: cpu - cpu_before.get(pid, 0.0) for pid, (_, _, cpu) in by_pid.items()}
        cpu_before = {pid: cpu for pid, (_, _, cpu) in by_pid.items()}
        interval = max(now - then, 0.1)
        parent_busy = spent.pop(child.pid, 0.0) / interval
        children_busy = sum(spent.values()) / interval
        then = now
        timeline.append((now, round(parent_pss / GIB, 3), round(sum(pss_by_pid.values()) / GIB, 3),
                         round(parent_busy, 2), round(children_busy, 2)))
        tree_pss.append((now, pss / GIB))
        tree_busy.append((now, parent_busy + children_busy))
        rss_by_pid = {pid: value for pid, (value, _, _) in by_pid.items()}
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        peak_parent = max(peak_parent, rss_by_pid.pop(child.pid, 0))
        peak_other = max(peak_other, *rss_by_pid.values(), 0)
        time.sleep(0.5)
    wall = time.perf_counter() - began
    reader.join(timeout=10)
    return {"command": " ".join(command[1:]), "exit": child.returncode, "wall_s": round(wall, 1),
            "peak_tree_rss_gib": round(peak_rss / GIB, 2), "peak_tree_pss_gib": round(peak_pss / GIB, 2),
            "peak_single_process_rss_gib": round(max(peak_parent, peak_other) / GIB, 2),
            "peak_edgeship_process_rss_gib": round(peak_parent / GIB, 2),
            "peak_child_process_rss_gib": round(peak_other / GIB, 2),
            "busy_cores": round(sum(c for _, c in tree_busy) / max(len(tree_busy), 1), 2),
            "phases": phases(lines, tree_pss, tree_busy), "stderr_tail": [line for _, line in lines[-5:]],
            "timeline": {"columns": ["seconds", "edgeship_pss_gib", "children_pss_gib", "edgeship_busy_cores",
                                     "children_busy_cores"], "samples": timeline}}


def main(argv: list[str]) -> int:
    timeline_path = None
    if "--timeline" in argv:
        at = argv.index("--timeline")
        timeline_path, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    result = measure(argv)
    timeline = result.pop("timeline")
    if timeline_path is not None:
        timeline_path.write_text(json.dumps({**timeline, "phases": result["phases"]}))
    print(json.dumps(result, indent=1))
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
