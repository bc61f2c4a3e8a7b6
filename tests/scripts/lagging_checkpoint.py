"""Two kfac_ddp ranks; at the step a checkpoint is written, rank 1 lags by LAG seconds before the
save. Each rank writes the running factors it owns at that step (read directly from the engine)
to ``<out>/owned-rank<R>.pt``; rank 0 writes when its step ended and when its checkpoint was
written (``step-end.txt``, ``saved.txt``)."""

from __future__ import annotations

import argparse
import os
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_kfac
from lightning_kfac.testing.lightning import SyntheticData, TinyNet, quiet_trainer

LAG = 3.0
CHECKPOINT_STEP = 2


class Lagger(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != CHECKPOINT_STEP:
            return
        if trainer.global_rank == 0:
            with open(os.path.join(self.out, "step-end.txt"), "w") as f:
                f.write(str(time.time()))
        pre = trainer.strategy.preconditioner
        owned = {name: (a.clone(), g.clone()) for name, (a, g) in pre.factors().items() if a is not None}
        torch.save({"owned": owned, "steps": pre.steps}, os.path.join(self.out, f"owned-rank{trainer.global_rank}.pt"))
        if trainer.global_rank == 1:
            time.sleep(LAG)


class SaveTimer(ModelCheckpoint):
    def _save_checkpoint(self, trainer, filepath) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.global_rank == 0:
            with open(os.path.join(os.path.dirname(os.path.dirname(filepath)), "saved.txt"), "w") as f:
                f.write(str(time.time()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = quiet_trainer(
        strategy="kfac_ddp",
        callbacks=[
            lightning_kfac.KFACCallback(damping=1e-2, inv_update_freq=2, summary=False),
            Lagger(args.out),
            SaveTimer(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1),
        ],
        devices=2,
        max_steps=CHECKPOINT_STEP + 1,
        enable_checkpointing=True,
    )
    trainer.fit(TinyNet(lr=0.1), datamodule=SyntheticData(batch_size=16, n=96))


if __name__ == "__main__":
    main()
