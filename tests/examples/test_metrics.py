"""The examples' evaluation is exact on 2 processes: each sample of the validation and test sets
is evaluated once (no padded repeats), and the logged accuracy and loss are those of the whole
set, also when the set does not split evenly into the processes' batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from tests.conftest import ROOT, script_env

SCRIPT = os.path.join(ROOT, "tests", "examples", "eval_script.py")
N_TRAIN, N_TEST, VAL_SIZE, BATCH, WORLD = 60, 97, 33, 8, 2


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def _make_data(folder: str, model: torch.nn.Module) -> None:
    """Random images; labels chosen from ``model``'s own predictions so that exactly the images
    with index divisible by 3 are classified correctly (image 0 among them)."""
    from fashion_mnist import FILES, load_split, write_idx

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        write_idx(os.path.join(folder, FILES[f"{split}_images"]), torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(os.path.join(folder, FILES[f"{split}_labels"]), torch.zeros(n, dtype=torch.uint8))
        x, _ = load_split(folder, split)
        with torch.no_grad():
            predicted = model(x).argmax(-1)
        correct = torch.arange(n) % 3 == 0
        labels = torch.where(correct, predicted, (predicted + 1) % 10)
        write_idx(os.path.join(folder, FILES[f"{split}_labels"]), labels)


def _padded_accuracy(model: torch.nn.Module, dataset: TensorDataset) -> float:
    """What the old evaluation logged: Lightning's DistributedSampler gives every process as many
    samples by repeating the first ones, and the batch-size-weighted mean of the per-batch
    accuracies over all processes is the accuracy over that padded list."""
    index = [i for rank in range(WORLD) for i in DistributedSampler(dataset, WORLD, rank, shuffle=False)]
    assert len(index) > len(dataset)  # the test only means something when the data is padded
    x, y = dataset.tensors
    return _accuracy(model, x[index], y[index])


def test_two_process_evaluation_logs_the_exact_accuracy(tmp_path):
    from fashion_mnist import FashionClassifier, FashionMNISTDataModule

    assert N_TEST % (WORLD * BATCH) != 0 and VAL_SIZE % (WORLD * BATCH) != 0
    torch.manual_seed(0)
    model = FashionClassifier(arch="mlp").eval()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _make_data(str(data_dir), model)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)

    # the exact figures, from the whole sets in one piece
    data = FashionMNISTDataModule(data_dir=str(data_dir), val_size=VAL_SIZE)
    data.setup("test")
    x_test, y_test = data.test_set.tensors
    exact_test = _accuracy(model, x_test, y_test)
    assert exact_test == pytest.approx(33 / 97)  # indices 0, 3, ..., 96
    exact_val = _accuracy(model, *data.val_set.tensors)
    with torch.no_grad():
        exact_test_loss = F.cross_entropy(model(x_test), y_test).item()
        exact_val_loss = F.cross_entropy(model(data.val_set.tensors[0]), data.val_set.tensors[1]).item()
    padded_test = _padded_accuracy(model, data.test_set)
    assert padded_test == pytest.approx(34 / 98)  # image 0, classified correctly, counted twice
    assert abs(padded_test - exact_test) > 1e-3

    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, SCRIPT, "--data-dir", str(data_dir), "--weights", str(weights), "--out", str(out),
        "--devices", str(WORLD), "--batch-size", str(BATCH), "--val-size", str(VAL_SIZE),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world_size"] == WORLD for r in ranks)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # synchronised
    metrics = ranks[0]["metrics"]

    # every sample evaluated once: the shares add up to the set, and they differ (49 / 48 test
    # images in 7 / 6 batches: the ranks ran different numbers of batches, and nothing hung)
    for loop, n in (("validate", VAL_SIZE), ("test", N_TEST)):
        shares = [sum(r["batch_sizes"][loop]) for r in ranks]
        assert sum(shares) == n, (loop, shares)
    assert [len(r["batch_sizes"]["test"]) for r in ranks] == [7, 6]

    assert metrics["test_acc"] == pytest.approx(exact_test, abs=1e-6)
    assert metrics["val_acc"] == pytest.approx(exact_val, abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(exact_test_loss, rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(exact_val_loss, rel=1e-5)
    # the old way, run for real: it logged the padded figure, off the exact one
    assert metrics["legacy_test_acc"] == pytest.approx(padded_test, abs=1e-6)
    assert abs(metrics["legacy_test_acc"] - exact_test) > 1e-3
