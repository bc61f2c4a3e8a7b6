"""Evaluate ``examples/fashion_mnist.py``'s classifier, with given weights, on the IDX files in
``--data-dir`` with ``--devices`` processes, and write what each rank saw and logged to
``<out>/rank<R>.json``. Run as a script: Lightning's launcher re-executes it for every rank.
Launched by ``tests/examples/test_metrics.py``.

Three evaluations: ``trainer.validate`` and ``trainer.test`` of the example as it is (its data
module and its torchmetrics accuracy), and ``trainer.test`` the way the example used to do it
(accuracy computed by hand per batch, a plain loader that Lightning gives its padding
``DistributedSampler``), logged as ``legacy_test_acc``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_kfac.testing.lightning import quiet_trainer  # importing lightning_kfac registers "kfac_ddp"

# the user-facing example module fashion_mnist.py lives in examples/, which is not a package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples"))
from fashion_mnist import FashionClassifier, FashionMNISTDataModule


class BatchSizes(Callback):
    """The size of every evaluation batch this process ran, per loop."""

    def __init__(self) -> None:
        self.sizes: dict[str, list[int]] = {"validate": [], "test": []}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.sizes["validate"].append(len(batch[1]))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.sizes["test"].append(len(batch[1]))


class HandComputedAccuracy(FashionClassifier):
    """The example's former evaluation: the mean of each batch's accuracy, ``sync_dist=True``."""

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"legacy_{stage}_acc", acc, sync_dist=True, add_dataloader_idx=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-size", type=int, default=33)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    weights = torch.load(args.weights, weights_only=True)
    data = FashionMNISTDataModule(
        data_dir=args.data_dir, batch_size=args.batch_size, val_size=args.val_size, eval_batch_size=args.batch_size
    )
    model = FashionClassifier(arch="mlp")
    model.load_state_dict(weights)
    sizes = BatchSizes()
    trainer = quiet_trainer(strategy="kfac_ddp", devices=args.devices, limit_val_batches=1.0, callbacks=[sizes])
    metrics = dict(trainer.validate(model, datamodule=data, verbose=False)[0])
    metrics.update(trainer.test(model, datamodule=data, verbose=False)[0])

    legacy = HandComputedAccuracy(arch="mlp")
    legacy.load_state_dict(weights)
    trainer = quiet_trainer(strategy="kfac_ddp", devices=args.devices)
    loader = DataLoader(data.test_set, batch_size=args.batch_size)  # Lightning inserts its DistributedSampler
    metrics.update(trainer.test(legacy, dataloaders=loader, verbose=False)[0])

    result = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "batch_sizes": sizes.sizes,
        "world_size": trainer.world_size,
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
