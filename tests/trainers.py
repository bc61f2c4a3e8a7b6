"""Trainer construction shared by the tests and the scripts they launch (no pytest import, so a
subprocess script can use it with the repository root on its path)."""

from __future__ import annotations

from typing import Any


def quiet_trainer(**kwargs: Any):
    """A one-process CPU Trainer without logger, checkpoints, progress bar or validation;
    keyword arguments override these defaults."""
    import pytorch_lightning as pl

    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
