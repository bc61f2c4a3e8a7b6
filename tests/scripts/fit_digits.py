"""Fit the digits MLP with a given strategy and write each rank's final parameters to
``<out>/rank<R>.pt``. Run as a script (Lightning's launcher re-executes it for every rank)."""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
import torch

from lightning_kfac.testing.lightning import quiet_trainer  # importing lightning_kfac registers "kfac_ddp"

# the user-facing example module digits.py lives in examples/, which is not a package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples"))
from digits import DigitsClassifier, DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="kfac_ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(lr=0.05)
    trainer = quiet_trainer(strategy=args.strategy, devices=args.devices, max_steps=args.max_steps, deterministic=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=args.batch_size))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save(
        {"params": params, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
        os.path.join(args.out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
