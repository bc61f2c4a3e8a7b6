"""KFACCallback in real (one-process) fits: logged keys, progress bar, fit-start summary,
diagnostics, checkpointed schedules; and its helpers on plain preconditioners."""

from __future__ import annotations

import csv
import glob
import logging
import os
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACCallback, KFACPreconditioner  # importing lightning_kfac registers "kfac_ddp"
from lightning_kfac.engine import hyperparameters as rules
from lightning_kfac.engine.report import estimated_memory, fit_summary, layer_statistics
from lightning_kfac.engine.report import format_bytes as _bytes
from lightning_kfac.engine.staleness import LayerStaleness, StalenessConfig
from lightning_kfac.schedules import LinearWarmup, StepDecay
from lightning_kfac.testing.models import MLP, SmallCNN
from tests.conftest import quiet_trainer

TIME_KEYS = (
    "kfac/time_hooks_ms",
    "kfac/time_factors_ms",
    "kfac/time_inverse_ms",
    "kfac/time_precondition_ms",
    "kfac/time_total_ms",
)
REQUIRED_KEYS = (
    "kfac/damping",
    "kfac/kl_clip_scale",
    "kfac/comm_bytes",
    *TIME_KEYS,
)


def _trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{"strategy": "kfac_ddp", "max_steps": 6, **kwargs})


def _fit(trainer: pl.Trainer, model, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, **kwargs)


def _csv_rows(log_dir: str) -> list[dict[str, str]]:
    (path,) = glob.glob(os.path.join(log_dir, "**", "metrics.csv"), recursive=True)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- a real fit: CSV keys, progress bar ---------------------------------------------------------
def test_logged_keys_reach_the_csv_logger_every_log_every_n_steps(tmp_path, clean_process_group):
    pl.seed_everything(0)
    callback = KFACCallback(damping=LinearWarmup(start=1e-2, end=1e-3, duration=4))
    trainer = _trainer(callbacks=[callback], logger=CSVLogger(str(tmp_path)), log_every_n_steps=2)
    _fit(trainer, DigitsClassifier(), datamodule=DigitsDataModule())

    rows = [r for r in _csv_rows(str(tmp_path)) if r.get("kfac/time_total_ms")]
    for key in REQUIRED_KEYS:
        assert key in rows[0], key
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # every 2nd optimizer step
    by_step = {int(r["step"]): r for r in rows}
    # the value in force at each logged step: the schedule's
    assert float(by_step[1]["kfac/damping"]) == pytest.approx(1e-2 - 9e-3 / 4)
    assert float(by_step[5]["kfac/damping"]) == pytest.approx(1e-3)
    # constants once, as the loggers' hyperparameters; the scheduled damping on every log
    (hparams,) = glob.glob(os.path.join(str(tmp_path), "**", "hparams.yaml"), recursive=True)
    with open(hparams) as f:
        logged = yaml.safe_load(f)
    assert (
        logged["kfac/inv_update_freq"] == 10
        and logged["kfac/factor_update_freq"] == rules.DEFAULTS["factor_update_freq"]
    )
    assert all(not row.get("kfac/inv_update_freq") for row in rows)
    assert all(row["kfac/damping"] for row in rows)
    for row in rows:
        assert 0 < float(row["kfac/kl_clip_scale"]) <= 1
        assert float(row["kfac/comm_bytes"]) == 0  # one process: nothing travels
        assert all(float(row[k]) >= 0 for k in TIME_KEYS)
    assert not any(k.startswith("kfac/net.") for k in rows[0])  # diagnostics are off by default

    bar = trainer.progress_bar_metrics
    assert bar["kfac_damp"] == pytest.approx(1e-3)
    assert bar["kfac_inv"] == 0  # the only inversion of 6 steps at inv_update_freq=10: step 0
    assert callback.inversions == 1 and callback.last_inversion_step == 0


# --- the fit-start summary ----------------------------------------------------------------------
class _MixedNet(pl.LightningModule):
    """Three preconditioned layers and two skipped ones (grouped conv, frozen linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=2)
        self.fc = nn.Linear(144, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.head(torch.tanh(self.frozen(torch.tanh(self.fc(x.flatten(1))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
        return DataLoader(data, batch_size=16)


def test_fit_start_summary_is_printed_and_right_and_diagnostics_are_logged(tmp_path, clean_process_group, caplog):
    pl.seed_everything(0)
    callback = KFACCallback(
        inv_update_freq=2, diagnostics=True, exact_timings=True, adaptive=StalenessConfig(threshold=0.1, probe_after=2)
    )
    trainer = _trainer(callbacks=[callback], logger=CSVLogger(str(tmp_path)), log_every_n_steps=2, max_steps=4)
    with caplog.at_level(logging.INFO):
        _fit(trainer, _MixedNet())

    text = callback.summary_text
    assert text is not None
    assert any(r.getMessage() == text for r in caplog.records)  # printed at fit start (rank zero, INFO)
    header = text.splitlines()[0]
    assert header == "K-FAC: 3 layer(s) preconditioned (cholesky, factored damping, float32 factors), 2 left out"
    assert "COMM-OPT" not in text and "owner" not in text  # one process: no distribution to show
    rows = {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if line.startswith("  ") and not line.startswith("    ")
    }
    # name, kind, A, G
    assert rows["conv"] == ["conv", "Conv2d", "10x10", "4x4"]
    assert rows["fc"] == ["fc", "Linear", "145x145", "8x8"]
    assert rows["head"] == ["head", "Linear", "9x9", "3x3"]
    skipped = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")}
    assert "groups=2" in skipped["grouped"] and "Conv2d" in skipped["grouped"]
    assert "frozen" in skipped["frozen"] and "requires_grad=False" in skipped["frozen"]
    assert "adaptive intervals: threshold 0.1" in text
    assert (
        "change of the damped factors net of sampling noise, probe_after=2: "
        "a run of 2 changes in the hold band grows the interval" in text
    )
    # memory: float32 running factors + step accumulators + the two damped inverses (cholesky)
    dims = [(10, 4), (145, 8), (9, 3)]
    total = sum(2 * 4 * (a * a + g * g) + 4 * (a * a + g * g) for a, g in dims)
    assert f"estimated memory: {_bytes(total)}" in text

    rows = [r for r in _csv_rows(str(tmp_path)) if r.get("kfac/time_total_ms")]
    last = rows[-1]
    for layer in ("conv", "fc", "head"):
        assert float(last[f"kfac/{layer}/trace_A"]) > 0 and float(last[f"kfac/{layer}/trace_G"]) > 0
        assert float(last[f"kfac/{layer}/cond"]) >= 1
    assert not any(k.startswith("kfac/grouped/") for k in last)
    assert float(last["kfac/time_step_ms"]) > 0  # exact_timings adds the synchronised step time
    assert callback.inversions == 2 and callback.last_inversion_step == 2


def test_summary_for_two_ranks_shows_owners_and_per_rank_memory():
    pre = KFACPreconditioner(SmallCNN(), grad_worker_fraction=0.5)
    pre.world_size = 2  # as rank 0 of 2 would see it; prospective_plan needs no process group
    plan = pre.prospective_plan()
    text = fit_summary(pre, {"damping": 1e-3, "kl_clip": None})
    assert "2 ranks, MEM-OPT: 1 gradient worker(s) per layer" in text
    assert "damping=0.001, kl_clip=None" in text
    for name, layer in pre.layers.items():
        (line,) = [ln for ln in text.splitlines() if ln.split()[:1] == [name]]
        owner = plan.a_owner[name]
        assert line.split()[2:] == [
            f"{layer.a_dim}x{layer.a_dim}",
            f"{layer.g_dim}x{layer.g_dim}",
            f"{owner}/{owner}",
            str(owner),
        ]
    assert len({plan.a_owner[n] for n in pre.layers}) == 2  # both ranks own layers
    memory = estimated_memory(pre, plan)
    every_factor = sum(4 * (layer.a_dim**2 + layer.g_dim**2) for layer in pre.layers.values())
    assert sum(m["factors"] for m in memory) == every_factor  # each factor held by its owner only
    assert all(m["accumulators"] == every_factor for m in memory)  # every rank accumulates every layer
    assert "per rank: 0: " in text and ", 1: " in text


def test_summary_is_one_screen_for_many_layers():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(60)])
    text = fit_summary(KFACPreconditioner(model))
    assert len(text.splitlines()) <= 30
    assert "... and 36 smaller layer(s)" in text


# --- diagnostics on a plain preconditioner ------------------------------------------------------
def test_layer_statistics_traces_condition_numbers_and_intervals():
    torch.manual_seed(0)
    model = MLP((6, 5, 3))
    pre = KFACPreconditioner(model, damping=1e-2, inv_update_freq=1, kl_clip=None)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        pre.step()
    pre.staleness_states["net.0"] = LayerStaleness(StalenessConfig(), inverse_interval=10)
    stats = layer_statistics(pre)
    for name, (a, g) in pre.factors().items():
        assert stats[name]["trace_A"] == pytest.approx(float(torch.trace(a)))
        assert stats[name]["trace_G"] == pytest.approx(float(torch.trace(g)))
        d_a, d_g = torch.linalg.eigvalsh(a.double()), torch.linalg.eigvalsh(g.double())
        expected = (d_g.max() * d_a.max() + 1e-2) / (d_g.min().clamp(min=0) * d_a.min().clamp(min=0) + 1e-2)
        assert stats[name]["cond"] == pytest.approx(float(expected), rel=1e-3)
    assert stats["net.0"]["inv_interval"] == 10 and stats["net.0"]["factor_interval"] == 1
    assert "inv_interval" not in stats["net.2"]


# --- adaptive policy handed to the engine -------------------------------------------------------
def _fake_preconditioner(**extra):
    return types.SimpleNamespace(
        damping=None, factor_update_freq=None, inv_update_freq=None, factor_decay=None, kl_clip=None, **extra
    )


def test_apply_to_hands_the_adaptive_config_to_the_engine():
    config = StalenessConfig(threshold=0.02, max_interval=500)
    pre = _fake_preconditioner(staleness=None)
    KFACCallback(adaptive=config, inv_update_freq=20).apply_to(pre, step=0)
    assert pre.staleness is config and pre.inv_update_freq == 20 and type(pre.inv_update_freq) is int
    KFACCallback().apply_to(pre, step=0)
    assert pre.staleness is None
    old_engine = _fake_preconditioner()
    with pytest.warns(UserWarning, match="no adaptive"):
        KFACCallback(adaptive=config).apply_to(old_engine, step=0)


# --- schedules in a Lightning checkpoint --------------------------------------------------------
def test_schedules_are_restored_from_a_weights_only_lightning_checkpoint(tmp_path, clean_process_group):
    schedule = StepDecay(initial=0.02, milestones=[3], gamma=0.5)
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(callbacks=[KFACCallback(damping=schedule), checkpoint], enable_checkpointing=True, max_steps=4)
    _fit(trainer, DigitsClassifier(), datamodule=DigitsDataModule())
    (path,) = glob.glob(os.path.join(str(tmp_path), "*.ckpt"))

    saved = torch.load(path, weights_only=True, map_location="cpu")
    (state,) = [v for k, v in saved["callbacks"].items() if "KFACCallback" in k]
    assert state["schedules"]["damping"]["class"] == "StepDecay" and state["inversions"] == 1

    resumed = KFACCallback(damping=0.5)  # the checkpoint's schedule wins
    trainer = _trainer(callbacks=[resumed], max_steps=6)
    _fit(trainer, DigitsClassifier(), datamodule=DigitsDataModule(), ckpt_path=path)
    assert resumed.schedules["damping"] == schedule
    assert resumed.hyperparameters(trainer.global_step)["damping"] == pytest.approx(0.01)
    assert "kfac/time_total_ms" in trainer.callback_metrics
