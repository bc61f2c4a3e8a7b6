"""The benchmark code must not rot: its smoke mode runs the whole pipeline (tuning, seeds, the
2-process check, plots, RESULTS.md) on tiny budgets, on the real Fashion-MNIST files when they
are installed and on small generated IDX files otherwise, and on generated text for task 3
(no npm needed). Plus the IDX reader and the data module's error message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, script_env

BENCH = os.path.join(ROOT, "benchmarks")
# the benchmark scripts (harness, run, staleness) are plain modules in benchmarks/, not a package
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_roundtrip(tmp_path, name):
    from fashion_mnist import read_idx, write_idx

    data = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(str(tmp_path / name), data)
    assert torch.equal(read_idx(str(tmp_path / name)), data)


def test_missing_data_says_how_to_get_it(tmp_path):
    from fashion_mnist import FashionMNISTDataModule

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    with pytest.raises(FileNotFoundError, match="data_dir"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup("fit")


def test_data_module_on_generated_files(tmp_path):
    from fashion_mnist import FashionClassifier, FashionMNISTDataModule
    from run import write_fake_fashion

    folder = write_fake_fashion(str(tmp_path / "fm"), n_train=300, n_test=50)
    dm = FashionMNISTDataModule(data_dir=folder, batch_size=32, val_size=100)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 100, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.long
    for arch in ("mlp", "cnn"):
        assert FashionClassifier(arch=arch)(x).shape == (32, 10)


def test_to_target():
    from harness import to_target

    evals = [
        {"step": 10, "epoch": 0.1, "seconds": 1.0, "acc": 0.5},
        {"step": 20, "epoch": 0.2, "seconds": 2.0, "acc": 0.9},
    ]
    assert to_target(evals, "acc", 0.8, "max") == {"steps": 20, "epochs": 0.2, "seconds": 2.0}
    assert to_target(evals, "acc", 0.95, "max")["steps"] is None
    assert to_target(evals, "acc", 0.6, "min")["steps"] == 10


def test_smoke(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, os.path.join(BENCH, "run.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in (
        "RESULTS.md",
        "time_breakdown.png",
        "fmnist_mlp.png",
        "fmnist_cnn.png",
        "char_lm.png",
        "char_lm_target.json",
    ):
        assert (out / name).is_file(), name
    for task in ("fmnist_mlp", "fmnist_cnn", "char_lm"):
        summary = json.loads((out / f"{task}.json").read_text())
        assert set(summary["methods"]) == {"kfac", "sgd", "adamw"}
        assert summary["methods"]["kfac"]["kfac_ms_mean"]["precondition"] is not None
    assert json.loads((out / "fmnist_mlp.json").read_text())["dist"][0]["batch_per_process"] == 64
    results = (out / "RESULTS.md").read_text()
    assert "Smoke run" in results and "Distributed check" in results


def test_step_cost_quick_run_writes_its_table(tmp_path):
    # the per-step cost benchmark (issue 9) end to end on its smallest configuration: one
    # round, the 1/1 setting, the CNN, cholesky and bf16-factor eigen rows
    out = tmp_path / "step_cost.json"
    cmd = [
        sys.executable,
        os.path.join(BENCH, "step_cost.py"),
        "--quick",
        "--threads",
        "1",
        "--models",
        "cnn",
        "--methods",
        "cholesky",
        "eigen",
        "--factor-dtypes",
        "bfloat16",
        "--warmup",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["factor_dtype"]) for r in rows] == [
        ("cholesky", "float32"),
        ("eigen", "float32"),
        ("eigen", "bfloat16"),
    ]
    for row in rows:
        assert row["kfac_ms"] > 0 and row["floor_ms"] > row["sgd_ms"] > 0
        assert set(row["floor_pieces_ms"]) == {"factors_ms", "decompositions_ms", "precondition_ms"}
    assert rows[1]["kfac_over_peer"] == pytest.approx(rows[1]["kfac_over_sgd"] / 12.2)
    assert rows[2]["peer_over_sgd"] is None
    assert "x floor" in done.stdout


def test_staleness_quick_run_on_generated_files(tmp_path):
    # the stale-statistics benchmark (issue 5) end to end on tiny generated data: a fixed and an
    # adaptive run under the cosine schedule, counted by the engine and written to JSON
    from run import write_fake_fashion

    folder = write_fake_fashion(str(tmp_path / "fm"), n_train=700, n_test=100)
    out = tmp_path / "staleness.json"
    cmd = [
        sys.executable,
        os.path.join(BENCH, "staleness.py"),
        "--steps",
        "12",
        "--seeds",
        "0",
        "--fixed",
        "4",
        "--threshold",
        "0.1",
        "--start-interval",
        "4",
        "--min-interval",
        "2",
        "--max-interval",
        "8",
        "--damping",
        "0.01",
        "--lr",
        "0.03",
        "--lr-schedule",
        "cosine",
        "--data-dir",
        folder,
        "--val-size",
        "100",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fixed, adaptive = json.loads(out.read_text())["runs"]
    assert fixed["label"] == "fixed-4/f1/cos" and adaptive["label"] == "adaptive-t0.1[2,8]/damped/start4/cos"
    # the CNN's 4 layers inverted at steps 0, 4 and 8, their factors updated at every step
    assert (fixed["inversion_steps"], fixed["layer_inversions"]) == (3, 12)
    assert fixed["factor_layer_updates"] == 12 * 4
    assert 0 < adaptive["factor_layer_updates"] <= 12 * 4
    for run in (fixed, adaptive):
        assert run["steps"] == 12 and run["lr_schedule"] == "cosine"
        assert run["last_step_lr"] == pytest.approx(0.03 * (1 + math.cos(math.pi * 11 / 12)) / 2)  # annealed
        assert 0.0 <= run["test_acc"] <= 1.0
    assert set(adaptive["final_intervals"]) and all(2 <= v <= 8 for v in adaptive["final_intervals"].values())
    assert adaptive["adaptive"]["threshold"] == 0.1


def test_staleness_verdict_picks_the_cheapest_fixed_interval_that_reaches_the_adaptive_accuracy():
    from staleness import verdicts

    def run(label, seed, inversions, acc, adaptive=None):
        return {
            "label": label,
            "seed": seed,
            "steps": 100,
            "damping": 0.01,
            "lr_schedule": "cosine",
            "lr": 0.03,
            "kl_clip": 1e-3,
            "layer_inversions": inversions,
            "test_acc": acc,
            "adaptive": adaptive,
        }

    runs = [run("fixed-10", s, 400, 0.900) for s in (0, 1)]
    runs += [run("fixed-50", s, 80, a) for s, a in ((0, 0.897), (1, 0.898))]  # 0.8975: within 0.003 of 0.9
    runs += [run("fixed-100", s, 40, 0.890) for s in (0, 1)]  # too far below
    runs += [run("fixed-100", 0, 40, 0.890) | {"steps": 200}]  # another setting: not compared
    runs += [run("adaptive", s, n, 0.900, adaptive={"threshold": 0.1}) for s, n in ((0, 46), (1, 50))]
    (entry,) = verdicts(runs)
    assert entry["reference"] == "fixed-50" and entry["reference_seeds"] == [0, 1]
    assert entry["ratio"] == pytest.approx(48 / 80) and entry["met"] and entry["accuracy_kept"]  # 40% fewer
    runs[-1]["layer_inversions"] = 52
    (entry,) = verdicts(runs)
    assert entry["ratio"] == pytest.approx(49 / 80) and not entry["met"]
    # a fixed interval seen on fewer than min_seeds (2) common seeds is not a reference
    runs += [run("fixed-200", 1, 20, 0.95)]
    assert verdicts(runs)[0]["reference"] == "fixed-50"
    assert verdicts(runs, min_seeds=1)[0]["reference"] == "fixed-200"
    # an adaptive schedule less accurate than every fixed interval run gets no verdict, however cheap
    runs = [r for r in runs if r["label"] != "fixed-200"]
    for r in runs[-2:]:
        r.update(layer_inversions=10, test_acc=0.80)
    (entry,) = verdicts(runs)
    assert entry["reference"] == "fixed-100" and not entry["accuracy_kept"] and not entry["met"]


def test_batch_scaling_smoke_runs_every_stage_and_writes_its_figures(tmp_path):
    out = tmp_path / "bs"
    result = subprocess.run(
        [sys.executable, os.path.join(BENCH, "batch_scaling.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("RESULTS.md", "summary.json", "steps_to_target.png", "seconds_to_target.png", "step_cost.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for task in summary["tasks"]:
        assert [row["batch"] for row in task["rows"]] == [8, 32]
        for row in task["rows"]:
            for method in ("sgd", "adamw", "kfac"):
                entry = row["methods"][method]
                # the same number of trials for every method, and the final seeds on the chosen setting
                assert len(entry["trials"]) == task["trials_per_method"][str(row["batch"])]
                assert entry["seeds"] == [0, 1] and len(entry["steps_to_target"]) == 2
                assert entry["step_ms"] > 0
    # the 2-process check at the largest batch: the same steps to target as one process
    for name in ("mlp", "cnn"):
        dist = json.loads((out / f"dist_{name}.json").read_text())
        assert dist["agree"] and dist["steps_to_target_1_process"] == dist["steps_to_target_n_processes"], dist
        ablation = json.loads((out / f"ablation_{name}.json").read_text())
        assert {row["variant"] for row in ablation} == {"chosen", "momentum 0.9", "eigen, exact damping"}


def test_critical_batch_is_the_largest_within_2x_of_perfect_scaling_at_every_smaller_batch():
    from batch_scaling import critical_batches

    def rows(steps_by_method):
        batches = [128, 512, 2048, 8192]
        return [
            {"batch": b, "methods": {m: {"steps_median": s[i]} for m, s in steps_by_method.items()}}
            for i, b in enumerate(batches)
        ]

    # perfect scaling from 1000 at 128: 250, 62.5, 15.6; within 2x: <= 500, 125, 31.25
    result = critical_batches(
        rows({"sgd": [1000, 500, 130, 30], "adamw": [900, 400, 100, 60], "kfac": [400, 100, 30, 9]})
    )
    assert result["sgd"]["own"] == 512  # 130 > 125 at 2048 stops it, though 8192 would pass
    assert result["adamw"]["own"] == 2048 and result["kfac"]["own"] == 8192 and result["kfac"]["own_is_lower_bound"]
    # against the best method's start (K-FAC's 400 steps): AdamW's 900 is already over 2x at 128
    assert result["adamw"]["common"] is None and result["sgd"]["common"] is None
