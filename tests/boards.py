"""Python environments for the harness tests' boards (device_tests.loopback serves them)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_python_env(folder: Path, *packages: str) -> str:
    """A board's own Python environment (its runtime installed from the package registry)."""
    subprocess.run(["python3", "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *packages],
                   check=True, capture_output=True)
    return str(folder / "bin" / "python")
