"""The device runner runs a .tflite on every core, as ExecuTorch's threadpool and apps do."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from device_tests import runner


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_tflite_runs_on_every_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteRT's and tflite-runtime's Python APIs run one thread unless told otherwise: a .tflite's latency
    was measured on one core beside a .pte on all of them. XNNPACK starts a worker thread for each core
    beyond the caller's, so a runner on a 4-core device adds three threads to the process."""
    import litert_torch

    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    path = tmp_path / "mlp.tflite"
    litert_torch.convert(mlp, (torch.randn(4, 64),)).export(str(path))
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    before = _threads()
    run = runner.tflite_runner(path)
    inputs = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    (out,) = run([inputs])
    assert _threads() - before >= 3
    np.testing.assert_allclose(out, mlp(torch.from_numpy(inputs)).detach().numpy(), rtol=1e-4, atol=1e-5)
