"""`make test` runs its tests in two pytest-xdist workers. Tests that share a module-scoped fixture (boards,
exports) must all run in one worker, or that fixture is built once per worker: minutes lost each time."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SHARED_FIXTURE_MODULE = '''
import os
import pytest

@pytest.fixture(scope="module")
def board():
    with open("setups.txt", "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    return 1
''' + "".join(f"\ndef test_uses_board_{n}(board):\n    assert board\n" for n in range(6))

SINGLE_TESTS_MODULE = "".join(f"def test_single_{n}():\n    pass\n\n" for n in range(12))


def make_test_flags() -> list[str]:
    """The xdist flags `make test` passes, read from the Makefile so that this test follows them."""
    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("PYTEST_WORKERS"))
    flags = re.search(r"-n \$\(TEST_WORKERS\) ([^)]*)\)", line)
    assert flags, line
    return ["-n", "2", *flags.group(1).split()]


def test_tests_sharing_a_module_fixture_run_in_one_worker_and_build_it_once(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems\n")
    (tmp_path / "test_shared.py").write_text(SHARED_FIXTURE_MODULE)
    (tmp_path / "test_single.py").write_text(SINGLE_TESTS_MODULE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *make_test_flags()],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "18 passed" in run.stdout, run.stdout
    setups = (tmp_path / "setups.txt").read_text().split()
    assert len(setups) == 1, f"the module fixture was built in workers {setups}"
