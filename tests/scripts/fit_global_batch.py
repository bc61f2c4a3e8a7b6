"""Train SmallCNN for a few steps with kfac_ddp where every step sees the same global batch,
split evenly over the ranks; write rank R's final parameters to ``<out>/rank<R>.pt``."""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_kfac
from lightning_kfac.testing.models import SmallCNN, cnn_batches

GLOBAL_BATCH = 12
STEPS = 5


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        local = GLOBAL_BATCH // world
        xs, ys = [], []
        for x, y in cnn_batches(STEPS, GLOBAL_BATCH, torch.float64):
            xs.append(x[rank * local : (rank + 1) * local])
            ys.append(y[rank * local : (rank + 1) * local])
        return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=local, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--method", default="eigen")
    args = parser.parse_args()
    trainer = pl.Trainer(
        strategy=lightning_kfac.KFACDDPStrategy(
            inverse_method=args.method,
            grad_worker_fraction=args.fraction,
            factor_dtype="float64",
            inverse_dtype="float64",
        ),
        callbacks=[lightning_kfac.KFACCallback(damping=0.01, inv_update_freq=2, factor_decay=0.9, kl_clip=1e-2)],
        accelerator="cpu",
        devices=args.devices,
        precision="64-true",
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Module()
    trainer.fit(model)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save(params, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
