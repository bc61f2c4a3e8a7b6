"""Tiny Lightning modules, data, probes and a quiet Trainer for the Lightning tests; imported by the
in-process tests and by the multi-process scripts under ``tests/scripts``.

The data set has a fixed size that every world size used in the tests divides, so Lightning's
``DistributedSampler`` (seed 0, reshuffled each epoch) gives the same *global* batches on one
process with batch 2b as on two processes with b each: runs on different world sizes are the
same computation and can be compared.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 10
CLASSES = 4


def synthetic(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """A learnable 4-class problem: labels from a fixed random linear map plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, CLASSES, generator=g)).argmax(1)
    return TensorDataset(x.to(dtype), y)


class SyntheticData(pl.LightningDataModule):
    def __init__(
        self, batch_size: int = 32, n: int = 192, shuffle: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.batch_size, self.n, self.shuffle, self.dtype = batch_size, n, shuffle, dtype

    def setup(self, stage: str | None = None) -> None:
        self.train_set = synthetic(self.n, 0, self.dtype)
        self.eval_set = synthetic(64, 1, self.dtype)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_set, batch_size=16)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


class TinyNet(pl.LightningModule):
    """10-16-16-4 tanh MLP (three K-FAC layers).

    ``eval_in_train_mode``: validation/test/predict put the module in train mode and take an
    input gradient (a saliency-style metric) with autograd enabled, so the K-FAC forward *and*
    output-gradient hooks would fire there if the strategy did not stop them.
    ``aux_forward``: ``training_step`` also evaluates the model (train mode) on other inputs under
    ``torch.no_grad()``.
    ``manual``: manual optimization (``opt.step()`` on the LightningOptimizer), or with
    ``manual="raw"`` a raw torch optimizer stepped directly.
    """

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.0,
        hidden: int = 16,
        eval_in_train_mode: bool = False,
        manual: bool | str = False,
        explicit_precondition: bool = False,
        seed: int = 0,
        aux_forward: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)
        )
        self.lr, self.momentum = lr, momentum
        self.eval_in_train_mode = eval_in_train_mode
        self.manual = manual
        self.explicit_precondition = explicit_precondition
        self.aux_forward = aux_forward
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        if self.aux_forward:  # an extra evaluation of the (train-mode) model, e.g. for a metric
            with torch.no_grad():
                self.log("train_aux", self(torch.randn_like(x)).abs().mean())
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if not self.manual:
            return loss
        opt = self.optimizers(use_pl_optimizer=self.manual != "raw")
        assert not isinstance(opt, list)  # one optimizer
        opt.zero_grad()
        self.manual_backward(loss)
        if self.explicit_precondition:
            self.trainer.strategy.precondition(opt)  # type: ignore[attr-defined]  # KFACDDPStrategy
        opt.step()
        return None

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        if self.eval_in_train_mode:
            self.train()
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                loss = F.cross_entropy(self(x), y)
                (saliency,) = torch.autograd.grad(loss, x)
            self.log(f"{stage}_saliency", saliency.abs().mean(), sync_dist=True)
        else:
            loss = F.cross_entropy(self(x), y)
        self.log(f"{stage}_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        if self.eval_in_train_mode:
            self.train()
            with torch.enable_grad():
                x = batch[0].clone().requires_grad_(True)
                out = self(x)
                torch.autograd.grad(out.sum(), x)
            return out.detach()
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


# --- probes ---------------------------------------------------------------------------------------
_COLLECTIVES = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "scatter",
    "gather",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "new_group",
    "broadcast_object_list",
    "all_gather_object",
)
_KFAC_DIR = os.sep + "lightning_kfac" + os.sep


class KFACCollectiveCounter:
    """Counts torch.distributed calls issued from lightning_kfac code (any frame of the stack),
    by the phase a probe callback says the run is in."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, int] = {}
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            caller: FrameType | None = frame
            while caller is not None:
                if _KFAC_DIR in caller.f_code.co_filename:
                    self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
                    break
                caller = caller.f_back
            return original(*args, **kwargs)

        return counted


def recorded_now(pre: Any) -> bool:
    """Whether the preconditioner holds anything recorded for the next step."""
    return pre.recorded_anything()


def running_factors(pre: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, g) in pre.factors().items():
        if a is not None:
            out[name + ".A"] = a.clone()
        if g is not None:
            out[name + ".G"] = g.clone()
    return out


class EvalProbe(pl.Callback):
    """Watches what K-FAC does outside training batches: factors recorded, running factors or
    step counters changed, K-FAC collectives issued (with a :class:`KFACCollectiveCounter`).
    Also records per training batch the K-FAC collectives issued during it."""

    def __init__(self, counter: KFACCollectiveCounter | None = None) -> None:
        self.counter = counter
        self.violations: list[str] = []
        self.eval_batches: dict[str, int] = {}
        self.train_batch_collectives: list[tuple[int, int, int]] = []  # (global_step, batch_idx, count)
        self._before: dict[str, Any] | None = None
        self._count_before = 0

    def _phase(self, name: str) -> None:
        if self.counter is not None:
            self.counter.phase = name

    def _snapshot(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        if pre is None:
            return None
        return {"steps": pre.steps, "factors": running_factors(pre)}

    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        self._phase("sanity" if trainer.sanity_checking else stage)
        self._before = self._snapshot(trainer)

    def _end(self, trainer: pl.Trainer, stage: str) -> None:
        stage = "sanity" if trainer.sanity_checking else stage
        pre = getattr(trainer.strategy, "preconditioner", None)
        if pre is not None:
            if recorded_now(pre):
                self.violations.append(f"{stage}: factors recorded")
            after = self._snapshot(trainer)
            assert after is not None
            before = self._before or {"steps": None, "factors": {}}
            if after["steps"] != before["steps"]:
                self.violations.append(f"{stage}: steps {before['steps']} -> {after['steps']}")
            for key, value in after["factors"].items():
                if key not in before["factors"] or not torch.equal(before["factors"][key], value):
                    self.violations.append(f"{stage}: running factor {key} changed")
        self._phase("train")

    def _batch(self, trainer: pl.Trainer, stage: str) -> None:
        stage = "sanity" if trainer.sanity_checking else stage
        self.eval_batches[stage] = self.eval_batches.get(stage, 0) + 1
        pre = getattr(trainer.strategy, "preconditioner", None)
        if pre is not None and recorded_now(pre):
            self.violations.append(f"{stage}: factors recorded in a batch")

    def on_validation_start(self, trainer, pl_module):
        self._start(trainer, "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, "val")

    def on_validation_end(self, trainer, pl_module):
        self._end(trainer, "val")

    def on_test_start(self, trainer, pl_module):
        self._start(trainer, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, "test")

    def on_test_end(self, trainer, pl_module):
        self._end(trainer, "test")

    def on_predict_start(self, trainer, pl_module):
        self._start(trainer, "predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, "predict")

    def on_predict_end(self, trainer, pl_module):
        self._end(trainer, "predict")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._phase("train")
        self._count_before = self.counter.counts.get("train", 0) if self.counter else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.counter is not None:
            issued = self.counter.counts.get("train", 0) - self._count_before
            self.train_batch_collectives.append((int(trainer.global_step), int(batch_idx), int(issued)))
        self._phase("between")


# --- the multi-process comparison run ----------------------------------------------------------
#: one configuration for every world size: the global batch is GLOBAL_BATCH samples split
#: evenly over the ranks, two micro-batches per optimizer step, float64 throughout (so runs on
#: different world sizes agree to ~1e-12 and a lost factor shows as a large difference)
GLOBAL_BATCH = 32
N_TRAIN = 192  # 6 global batches -> 3 optimizer steps per epoch
ACCUMULATE = 2


def multi_run(
    devices: int,
    out_dir: str,
    epochs: int,
    extra_callbacks: list | None = None,
    num_nodes: int = 1,
    **trainer_kwargs: Any,
):
    """(model, datamodule, trainer) of the comparison run on ``devices`` processes on each of
    ``num_nodes`` nodes; a ModelCheckpoint writes ``<out_dir>/ckpt/epoch=E-step=S.ckpt`` after
    every epoch."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    import lightning_kfac

    model = TinyNet(lr=0.1, momentum=0.9, eval_in_train_mode=True).double()
    data = SyntheticData(batch_size=GLOBAL_BATCH // (devices * num_nodes), n=N_TRAIN, dtype=torch.float64)
    callbacks = [
        lightning_kfac.KFACCallback(
            damping=1e-2, factor_update_freq=1, inv_update_freq=2, factor_decay=0.9, kl_clip=1e-2
        ),
        ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), every_n_epochs=1, save_top_k=-1),
        *(extra_callbacks or []),
    ]
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        precision="64-true",
        max_epochs=epochs,
        accumulate_grad_batches=ACCUMULATE,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(trainer_kwargs)
    strategy = lightning_kfac.KFACDDPStrategy(factor_dtype="float64", inverse_dtype="float64")
    trainer = pl.Trainer(strategy=strategy, callbacks=callbacks, **kwargs)
    return model, data, trainer


class FinalState(pl.Callback):
    """The full K-FAC state at the end of training (a collective: every rank runs it)."""

    state: dict[str, Any] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = trainer.strategy.preconditioner.state_dict()  # type: ignore[attr-defined]  # KFACDDPStrategy


class OverflowNet(TinyNet):
    """Returns an infinite loss at batch ``bad_batch``: under 16-mixed the grad scaler finds
    inf gradients and skips that optimizer step."""

    def __init__(self, bad_batch: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_batch = bad_batch

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.bad_batch else loss


def cpu_fp16_plugin(init_scale: float = 2.0**12):
    """Lightning's real 16-mixed path on CPU: its MixedPrecision plugin with a CPU GradScaler and
    float16 CPU autocast (``precision="16-mixed"`` on CPU is turned into bf16-mixed)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


class StepWatch(pl.Callback):
    """At every training batch start: running factors, K-FAC step counter, parameters, loss scale."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pre = trainer.strategy.preconditioner
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.seen[(trainer.current_epoch, batch_idx)] = {
            "factors": running_factors(pre),
            "steps": pre.steps,
            "global_step": trainer.global_step,
            "params": flat_params(pl_module),
            "scale": scaler.get_scale() if scaler is not None else None,
        }


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
