"""kfac_ddp under ordinary Lightning habits: saving a checkpoint after ``fit``, resuming from a
checkpoint without K-FAC state, ``BackboneFinetuning`` (layers frozen at the start, unfrozen
later), and a ``KFACCallback`` given to a strategy that is not K-FAC's. Oracles: an
uninterrupted run, the gradient before K-FAC."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning
from torch import nn

from lightning_kfac import KFACCallback
from lightning_kfac.testing.lightning import SyntheticData, TinyNet, flat_params
from tests.conftest import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "clean_process_group")

EPOCH_STEPS = 6  # SyntheticData(n=192) at batch 32


def _callback() -> KFACCallback:
    # factors every 2 steps, inversions every 4: a resumed run starts between both
    return KFACCallback(damping=1e-2, factor_update_freq=2, inv_update_freq=4, factor_decay=0.9, kl_clip=1e-2)


def _fit(epochs: int, ckpt_path: str | None = None, save_to: str | None = None):
    model = TinyNet(lr=0.1, momentum=0.9)
    trainer = quiet_trainer(strategy="kfac_ddp", callbacks=[_callback()], max_epochs=epochs, deterministic=True)
    trainer.fit(model, datamodule=SyntheticData(batch_size=32), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return flat_params(model)


def test_a_checkpoint_saved_after_fit_holds_the_kfac_state_and_resumes_exactly(tmp_path):
    uninterrupted = _fit(2)
    path = str(tmp_path / "after_fit.ckpt")
    _fit(1, save_to=path)
    saved = torch.load(path, weights_only=True)
    assert saved["kfac"]["steps"] == EPOCH_STEPS
    assert all({"running_a", "running_g"} <= set(layer) for layer in saved["kfac"]["layers"].values())
    resumed = _fit(2, ckpt_path=path)
    assert float((resumed - uninterrupted).abs().max()) <= 1e-6


def test_resuming_from_a_checkpoint_without_kfac_state_warns_once(tmp_path):
    path = str(tmp_path / "after_fit.ckpt")
    _fit(1, save_to=path)
    stripped = torch.load(path, weights_only=False)
    del stripped["kfac"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(2, ckpt_path=str(tmp_path / "stripped.ckpt"))
    messages = [str(w.message) for w in caught if "K-FAC state" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "afresh" in messages[0]


@pytest.mark.parametrize("strategy", ["ddp", "auto"])
def test_a_kfac_callback_with_another_strategy_is_refused_at_fit_start(strategy):
    trainer = quiet_trainer(strategy=strategy, callbacks=[KFACCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="kfac_ddp"):
        trainer.fit(TinyNet(), datamodule=SyntheticData(batch_size=32))


class FinetunedNet(TinyNet):
    """TinyNet split into a ``backbone`` (two layers) and a ``head``, for BackboneFinetuning; its
    own ``on_before_optimizer_step`` (after every callback's) records the backbone's gradient."""

    def __init__(self) -> None:
        super().__init__(lr=0.1, momentum=0.9)
        self.backbone = nn.Sequential(self.net[0], self.net[1], self.net[2], self.net[3])
        self.head = self.net[4]
        self.after_kfac: list[torch.Tensor | None] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        grad = self.backbone[0].weight.grad
        self.after_kfac.append(None if grad is None else grad.clone())


class PlainGradient(pl.Callback):
    """Placed before KFACCallback: the backbone's gradient as backward left it."""

    def __init__(self) -> None:
        self.before_kfac: list[torch.Tensor | None] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grad = pl_module.backbone[0].weight.grad
        self.before_kfac.append(None if grad is None else grad.clone())


def test_backbone_layers_unfrozen_by_backbone_finetuning_are_preconditioned_from_their_first_step():
    model, plain = FinetunedNet(), PlainGradient()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    trainer = quiet_trainer(
        strategy="kfac_ddp", callbacks=[plain, finetuning, _callback()], max_epochs=2, deterministic=True
    )
    trainer.fit(model, datamodule=SyntheticData(batch_size=32))
    assert all(g is None for g in plain.before_kfac[:EPOCH_STEPS])  # frozen in epoch 0
    for before, after in zip(plain.before_kfac[EPOCH_STEPS:], model.after_kfac[EPOCH_STEPS:], strict=True):
        assert before is not None and after is not None
        assert float((after - before).norm() / before.norm()) > 1e-2  # K-FAC changed it, from the first step
