"""Through the Lightning strategy: 2 processes equal 1 process on the concatenated global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, script_env

SCRIPT = os.path.join(ROOT, "tests", "scripts", "fit_global_batch.py")


def _fit(out, devices: int, fraction: float, method: str) -> list[torch.Tensor]:
    os.makedirs(out, exist_ok=True)
    cmd = [
        sys.executable,
        SCRIPT,
        "--out",
        str(out),
        "--devices",
        str(devices),
        "--fraction",
        str(fraction),
        "--method",
        method,
    ]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(devices)]


@pytest.mark.parametrize("fraction,method", [(1.0, "eigen"), (0.5, "cholesky")])
def test_two_process_strategy_equals_one_process_on_the_global_batch(tmp_path, fraction, method):
    single = _fit(tmp_path / "one", 1, 1.0, method)[0]
    rank0, rank1 = _fit(tmp_path / "two", 2, fraction, method)
    assert torch.equal(rank0, rank1)
    error = float((rank0 - single).norm() / single.norm())
    assert error <= 1e-9, error


def test_char_transformer_trains_with_kfac_ddp_on_two_processes(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "scripts", "fit_char_transformer.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(rank0["params"], rank1["params"])
    first, last = sum(rank0["losses"][:3]) / 3, sum(rank0["losses"][-3:]) / 3
    assert last < 0.8 * first, (first, last)
