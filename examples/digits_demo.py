"""The demo: the same MLP on scikit-learn's digits, trained with K-FAC (``strategy="kfac_ddp"``)
and with plain SGD (``strategy="ddp"``), on 2 CPU processes; prints both test accuracies.

    python examples/digits_demo.py [--devices 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import pytorch_lightning as pl

# the example module digits.py sits next to this script in examples/, which is not a package
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import DigitsClassifier, DigitsDataModule

import lightning_kfac


def train(strategy: str, devices: int, epochs: int, seed: int) -> float:
    pl.seed_everything(seed, workers=True, verbose=False)
    model = DigitsClassifier(lr=0.05, momentum=0.9)
    data = DigitsDataModule(batch_size=64)
    # a global batch of 128: the small-batch settings (the defaults are for large batches)
    small_batch = lightning_kfac.KFACCallback(damping=0.1, kl_clip=0.01)
    callbacks = [small_batch] if strategy == "kfac_ddp" else []
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)
    return float(result[0]["test_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    kfac = train("kfac_ddp", args.devices, args.epochs, args.seed)
    sgd = train("ddp", args.devices, args.epochs, args.seed)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"\ndigits, {args.epochs} epochs, {args.devices} CPU processes, same model, lr and seed:")
        print(f"  K-FAC (kfac_ddp) test accuracy: {kfac:.4f}")
        print(f"  SGD   (ddp)      test accuracy: {sgd:.4f}")


if __name__ == "__main__":
    main()
