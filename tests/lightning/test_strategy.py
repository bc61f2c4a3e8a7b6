"""The strategy through Lightning: one process in-process, two processes as a script."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.strategies import StrategyRegistry

import lightning_kfac
from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.engine import hyperparameters as rules
from tests.conftest import ROOT, quiet_trainer, script_env


def _trainer(strategy, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"strategy": strategy, "max_steps": 15, **kwargs})


def test_strategy_string_is_registered_and_reimport_is_harmless():
    import importlib

    assert "kfac_ddp" in StrategyRegistry
    importlib.reload(lightning_kfac)
    assert StrategyRegistry["kfac_ddp"]["strategy"] is lightning_kfac.strategy.KFACDDPStrategy


def test_string_selects_the_strategy_and_adds_the_default_callback(clean_process_group):
    pl.seed_everything(0)
    trainer = _trainer("kfac_ddp")
    assert isinstance(trainer.strategy, KFACDDPStrategy)
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, KFACCallback)]
    assert callback.hyperparameters(0) == pytest.approx(rules.DEFAULTS)
    assert callback.inversions > 0 and "kfac/time_total_ms" in trainer.callback_metrics
    assert trainer.strategy.preconditioner is None  # removed at teardown


def test_one_process_kfac_changes_the_trajectory_and_lowers_the_loss(clean_process_group):
    losses = {}
    for strategy in ("kfac_ddp", "ddp"):
        pl.seed_everything(0)
        model = DigitsClassifier(lr=0.05)
        callbacks = [KFACCallback(damping=0.1, kl_clip=0.01)] if strategy == "kfac_ddp" else []
        trainer = _trainer(strategy, max_steps=40, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=DigitsDataModule())
        losses[strategy] = float(trainer.callback_metrics["train_loss"])
    assert losses["kfac_ddp"] < losses["ddp"]


def test_hooks_are_installed_during_fit_only(clean_process_group):
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pre = trainer.strategy.preconditioner
            seen["layers"] = sorted(pre.layers)
            seen["steps"] = pre.steps

    trainer = _trainer("kfac_ddp", max_steps=3, callbacks=[Probe()])
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    assert seen == {"layers": ["net.0", "net.2", "net.4"], "steps": 3}
    model = trainer.lightning_module
    assert all(not m._forward_hooks for m in model.modules())


def _run_script(tmp_path, *args: str) -> list[dict]:
    env = script_env()
    cmd = [sys.executable, os.path.join(ROOT, "tests", "scripts", "fit_digits.py"), "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith("rank"))
    return [torch.load(os.path.join(tmp_path, f)) for f in files]


def test_two_processes_train_and_end_with_identical_parameters(tmp_path):
    results = _run_script(tmp_path, "--devices", "2", "--max-steps", "12")
    assert len(results) == 2
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert results[0]["metrics"]["kfac/inversions"] > 0  # the default KFACCallback ran and logged
