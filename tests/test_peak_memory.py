"""Peak memory as the bench and the device runner report it: each process's own."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_a_child_process_reports_its_own_peak_memory_not_its_parents() -> None:
    """Python's subprocess starts a child by vfork and exec, and Linux's ru_maxrss then carries the parent's
    peak into the child: every engine the bench ran reported at least the bench's own peak."""
    ballast = bytearray(800 * 2**20)  # filled, so resident: this process's peak is above 800 MB
    code = "from device_tests.runner import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert child.returncode == 0, child.stderr
    assert 1 < float(child.stdout) < 200, child.stdout
    assert len(ballast) == 800 * 2**20
