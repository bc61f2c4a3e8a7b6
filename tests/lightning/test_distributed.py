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


def _fit_char_transformer(out, strategy: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    script = os.path.join(ROOT, "tests", "scripts", "fit_char_transformer.py")
    cmd = [sys.executable, script, "--out", str(out), "--strategy", strategy]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


def _mean_of_last_three(losses: list[float]) -> float:
    return sum(losses[-3:]) / 3


def test_char_transformer_trains_with_kfac_ddp_on_two_processes(tmp_path):
    rank0, rank1 = _fit_char_transformer(tmp_path / "kfac", "kfac_ddp")
    assert torch.equal(rank0["params"], rank1["params"])
    first, last = sum(rank0["losses"][:3]) / 3, _mean_of_last_three(rank0["losses"])
    assert last < 0.8 * first, (first, last)
    # control: the same run (seed, data order, SGD-momentum) with plain ddp. K-FAC must end
    # clearly lower (measured: 1.76 vs 2.12 nats/char), not merely train
    control, _ = _fit_char_transformer(tmp_path / "ddp", "ddp")
    assert control["losses"][0] == pytest.approx(rank0["losses"][0])  # same start
    control_last = _mean_of_last_three(control["losses"])
    assert last < 0.95 * control_last, (last, control_last)
