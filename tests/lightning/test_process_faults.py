"""A rank killed mid-training under ``torchrun --max-restarts=1``: the job restarts, resumes from
the last checkpoint with its K-FAC state, and ends exactly where a run that was never
interrupted, resumed from the same checkpoint, ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from lightning_kfac.testing.distributed import free_port
from tests.conftest import ROOT, script_env

SCRIPT = os.path.join(ROOT, "tests", "scripts", "fault_run.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
KILL_AT_STEP = 7  # in epoch 2 (3 optimizer steps an epoch), after the epoch-1 checkpoint


def _torchrun(out, *args: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [
        TORCHRUN,
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        SCRIPT,
        "--out",
        str(out),
        *args,
    ]
    env = script_env(GLOO_SOCKET_IFNAME="lo")
    # a session of its own, so that a failing test can end torchrun and its workers together
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timeout_error:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun did not finish:\n" + output[-4000:]) from timeout_error
    if proc.returncode != 0:
        _end_session(proc)
    assert proc.returncode == 0, output[-4000:]
    return output


def _end_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def test_killed_rank_restarts_and_resumes_with_its_kfac_state(tmp_path):
    faulted = tmp_path / "faulted"
    faulted.mkdir()
    proc = _torchrun(faulted, "--kill-at-step", str(KILL_AT_STEP), restarts=1)
    pid_file = faulted / "victim.pid"
    deadline = time.time() + 240
    while not pid_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            _end_session(proc)
            raise AssertionError("the victim rank never reached its step:\n" + proc.communicate()[0][-4000:])
        time.sleep(0.2)
    # the checkpoint the restarted job will resume from, as it was before the kill
    checkpoints = sorted(os.listdir(faulted / "ckpt"))
    assert checkpoints[-1] == "epoch=1-step=6.ckpt", checkpoints
    saved = tmp_path / "epoch=1-step=6.ckpt"
    shutil.copy(faulted / "ckpt" / checkpoints[-1], saved)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    _finish(proc)
    assert (faulted / "resumed-from.txt").read_text() == "epoch=1-step=6.ckpt"

    clean = tmp_path / "clean"
    clean.mkdir()
    _finish(_torchrun(clean, "--resume", str(saved)))

    for rank in range(2):
        restarted = torch.load(faulted / f"final-rank{rank}.pt", weights_only=False)
        reference = torch.load(clean / f"final-rank{rank}.pt", weights_only=False)
        assert restarted["global_step"] == reference["global_step"] == 12
        assert float((restarted["params"] - reference["params"]).abs().max()) <= 1e-6
        for name, layer in reference["kfac"]["layers"].items():
            for key, value in layer.items():
                assert torch.allclose(restarted["kfac"]["layers"][name][key], value, rtol=0, atol=1e-6), (name, key)


def test_checkpoint_written_while_a_rank_lags_holds_every_owners_factors(tmp_path):
    script = os.path.join(ROOT, "tests", "scripts", "lagging_checkpoint.py")
    proc = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path)], env=script_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 wrote only after the lagging rank caught up (the K-FAC state is gathered collectively)
    waited = float((tmp_path / "saved.txt").read_text()) - float((tmp_path / "step-end.txt").read_text())
    assert waited >= 2.5, waited
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    state = checkpoint["kfac"]
    owned = [torch.load(tmp_path / f"owned-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(o["steps"] == state["steps"] == 2 for o in owned)
    by_owner = {name: factors for o in owned for name, factors in o["owned"].items()}
    assert set(by_owner) == set(state["layers"]) and len(by_owner) == 3
    assert {name for o in owned for name in o["owned"]} == set(by_owner)  # each layer owned once
    for name, (a, g) in by_owner.items():
        assert torch.equal(state["layers"][name]["running_a"], a)
        assert torch.equal(state["layers"][name]["running_g"], g)
