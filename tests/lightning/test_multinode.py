"""kfac_ddp across processes and nodes, as scripts (Lightning's launcher re-executes its script;
torchrun starts the ranks itself):

* two processes train like one process on the same global batches (the comparison that makes the
  next checks meaningful);
* resume 2 -> 1 and 1 -> 2 devices continues the run and loses no factor state;
* under 16-mixed (CPU GradScaler) a step the scaler skips leaves every rank's factors as they
  were, with that step's reductions already launched from the backward hooks;
* sanity check, validation (module in train mode, autograd on), test and predict issue no K-FAC
  collective and record nothing; with accumulate_grad_batches=2 K-FAC communicates only in
  the micro-batch that ends an optimizer step;
* ``torchrun --nnodes=2 --nproc_per_node=1`` twice on 127.0.0.1 equals the one-node 2-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.testing.distributed import free_port
from lightning_kfac.testing.lightning import ACCUMULATE, FinalState, flat_params, multi_run
from tests.conftest import ROOT, script_env

SCRIPT = os.path.join(ROOT, "tests", "scripts", "kfac_multi.py")


pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TIMEOUT = 300
EPOCH0 = "epoch=0-step=3.ckpt"
EPOCH1 = "epoch=1-step=6.ckpt"


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fit_in_process(out, ckpt_path=None):
    final = FinalState()
    model, data, trainer = multi_run(1, str(out), 2, [final])
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    finally:
        _destroy_group()
    return {"params": flat_params(model), "kfac": final.state, "global_step": trainer.global_step}


def _load(path):
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    result = _fit_in_process(out)
    result["ckpt"] = out / "ckpt"
    return result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_process):
    """One launch: a fresh 2-process run, then the same run resumed from the 1-process epoch-0
    checkpoint."""
    out = tmp_path_factory.mktemp("two")
    cmd = [
        sys.executable,
        SCRIPT,
        "--out",
        str(out),
        "--devices",
        "2",
        "--resume",
        str(one_process["ckpt"] / EPOCH0),
        "--amp",
    ]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "fresh": [_load(out / f"fresh-rank{r}.pt") for r in range(2)],
        "resume": [_load(out / f"resume-rank{r}.pt") for r in range(2)],
        "amp": [_load(out / f"amp-rank{r}.pt") for r in range(2)],
        "ckpt": out / "fresh" / "ckpt",
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _factor_diff(state_a: dict, state_b: dict) -> float:
    layers_a, layers_b = state_a["layers"], state_b["layers"]
    assert layers_a.keys() == layers_b.keys()
    worst = 0.0
    for name in layers_a:
        for key in ("running_a", "running_g"):
            a, b = layers_a[name][key], layers_b[name][key]
            worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


def test_two_processes_train_like_one_process_on_the_same_global_batches(one_process, two_processes):
    rank0, rank1 = two_processes["fresh"]
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["global_step"] == one_process["global_step"] == 6
    diff = _max_diff(rank0["params"], one_process["params"])
    factor_diff = _factor_diff(rank0["kfac"], one_process["kfac"])
    print(f"2 processes vs 1: max abs parameter diff {diff:.2e}, factor rel diff {factor_diff:.2e}")
    assert diff <= 1e-9
    assert factor_diff <= 1e-9


def test_resume_two_to_one_device_continues_the_run_and_keeps_every_factor(two_processes, tmp_path):
    reference = two_processes["fresh"][0]
    ckpt = two_processes["ckpt"] / EPOCH0
    saved = torch.load(ckpt, weights_only=True)["kfac"]
    # the 2-process checkpoint holds every layer's factors and decompositions (each rank owned some)
    decomposed = {"running_a", "running_g", *KFACConfig().block_class.decomposition_keys}
    assert all(decomposed <= set(v) for v in saved["layers"].values())
    resumed = _fit_in_process(tmp_path / "resumed", ckpt_path=str(ckpt))
    diff = _max_diff(resumed["params"], reference["params"])
    factor_diff = _factor_diff(resumed["kfac"], reference["kfac"])
    # control: the same resume without the K-FAC state in the checkpoint
    stripped = torch.load(ckpt, weights_only=False)
    del stripped["kfac"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    control = _fit_in_process(tmp_path / "control", ckpt_path=str(tmp_path / "stripped.ckpt"))
    control_diff = _max_diff(control["params"], reference["params"])
    print(
        f"resume 2->1: max abs parameter diff {diff:.2e} (factor rel diff {factor_diff:.2e}); "
        f"without the K-FAC state {control_diff:.2e}"
    )
    assert diff <= 1e-9 and factor_diff <= 1e-9
    assert control_diff > 1e-4


def test_resume_one_to_two_devices_continues_the_run_and_keeps_every_factor(one_process, two_processes):
    rank0, rank1 = two_processes["resume"]
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["global_step"] == 6 and rank0["world_size"] == 2
    diff = _max_diff(rank0["params"], one_process["params"])
    factor_diff = _factor_diff(rank0["kfac"], one_process["kfac"])
    print(f"resume 1->2: max abs parameter diff {diff:.2e}, factor rel diff {factor_diff:.2e}")
    assert diff <= 1e-9 and factor_diff <= 1e-9


def test_evaluation_loops_record_nothing_and_issue_no_kfac_collective(two_processes):
    for result in two_processes["fresh"]:
        assert result["violations"] == []
        # every loop ran (validation with the module in train mode and autograd on)
        assert {"sanity", "val", "test", "predict"} <= set(result["eval_batches"])
        counts = result["counts"]
        assert counts.get("train", 0) > 0  # the counter sees K-FAC's collectives
        assert {phase: counts.get(phase, 0) for phase in ("sanity", "val", "test", "predict")} == dict.fromkeys(
            ("sanity", "val", "test", "predict"), 0
        )


def test_accumulation_communicates_only_in_the_micro_batch_that_steps(two_processes):
    batches = two_processes["fresh"][0]["train_batch_collectives"]
    assert len(batches) == 12
    for _, batch_idx, issued in batches:
        if (batch_idx + 1) % ACCUMULATE:
            assert issued == 0, batches  # a micro-batch that does not end the window
        else:
            assert issued > 0, batches


def test_16_mixed_overflow_skips_the_step_on_every_rank_with_reductions_in_flight(two_processes):
    """Micro-batch 2 (first of optimizer step 1) overflows: the factor reductions launched from
    the backward hooks complete, nothing is updated, the ranks stay matched and go on."""
    rank0, rank1 = two_processes["amp"]
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["global_step"] == 4 and rank0["discarded"] == rank1["discarded"] == 1
    for result in (rank0, rank1):
        before, after = result["seen"][(0, 2)], result["seen"][(0, 4)]  # around optimizer step 1
        assert after["scale"] == before["scale"] / 2
        assert torch.equal(after["params"], before["params"])
        assert before["factors"] and after["factors"].keys() == before["factors"].keys()  # the ones this rank owns
        assert all(torch.equal(after["factors"][k], v) for k, v in before["factors"].items())
        assert after["steps"] == before["steps"] + 1 == after["global_step"]
        last = result["seen"][(0, 6)]  # the next step updated this rank's factors again
        assert all(not torch.equal(last["factors"][k], v) for k, v in after["factors"].items())


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed next to this python")
def test_torchrun_two_nodes_equal_one_node_two_processes(two_processes, tmp_path):
    port = free_port()
    env = script_env(GLOO_SOCKET_IFNAME="lo")
    procs = []
    for node_rank in (0, 1):
        out = tmp_path / f"node{node_rank}"
        out.mkdir()
        cmd = [
            TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}",
            SCRIPT, "--out", str(out), "--devices", "1", "--num-nodes", "2", "--no-eval",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    ranks = [_load(tmp_path / f"node{r}" / f"fresh-rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    one_node = two_processes["fresh"][0]
    for result in ranks:
        diff = _max_diff(result["params"], one_node["params"])
        print(f"torchrun 2 nodes vs 1 node x 2 processes: max abs parameter diff {diff:.2e}")
        assert diff <= 1e-12


@pytest.mark.parametrize("recipe", ["torchrun.sh", "slurm.sbatch"])
def test_launch_recipes_are_valid_shell(recipe):
    path = os.path.join(ROOT, "examples", recipe)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    with open(path) as f:
        text = f.read()
    assert "lightning_kfac" in text or "lightning-kfac" in text
    assert "num_nodes" in text and "devices" in text  # Lightning must be told the launcher's layout
