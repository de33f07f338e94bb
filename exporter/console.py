"""Where edgeship's own words go, apart from the toolchain's.

ExecuTorch's C++ runtime, LiteRT, TensorFlow, cpuinfo and the converters' progress bars write to the
process's stdout and stderr, most of it from C++ where no Python setting reaches. Unless ``-v`` is given,
the CLI points file descriptors 1 and 2 at a log file (``divert``), so all of that lands there, and prints
its own stage lines, tables and errors through ``out`` and ``err``, which keep the terminal.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

class _Current:
    """Whatever sys.stdout / sys.stderr is when written to (a test's capture included), until diverted."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


out: TextIO | _Current = _Current("stdout")  # edgeship's results (tables, paths)
err: TextIO | _Current = _Current("stderr")  # edgeship's stage lines and errors
log: Path | None = None  # where the toolchain's output went, once diverted


def divert(command: str) -> Path:
    """Send everything written to fds 1 and 2 (C++ and child processes included) to a fresh log file; keep
    ``out`` and ``err`` on the terminal. Returns the log's path."""
    global out, err, log
    folder = Path(os.environ.get("EDGESHIP_LOGS") or Path(tempfile.gettempdir()) / f"edgeship-logs-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{command}-", suffix=".log", dir=folder)
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    log = Path(name)
    return log


def finish(status: int) -> int:
    """The command's exit status; a failed one names the log, a successful one leaves none behind."""
    if log is not None:
        if status == 0:
            log.unlink(missing_ok=True)
        else:
            print(f"(the toolchain's own messages: {log}; -v shows them as they come)", file=err)
    return status
