"""Stage lines with elapsed time, on stderr so stdout stays for results."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from . import console


class Progress:
    def __init__(self, *, quiet: bool = False) -> None:
        self.start = time.monotonic()
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.start:7.1f}s] {message}", file=console.err, flush=True)

    @contextlib.contextmanager
    def stage(self, message: str) -> Iterator[None]:
        began = time.monotonic()
        self.say(f"{message} ...")
        yield
        self.say(f"{message} done in {time.monotonic() - began:.1f}s")
