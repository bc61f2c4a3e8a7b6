"""KFACCallback: the K-FAC hyperparameters of a run, applied to the strategy's preconditioner
every step, and logged under ``kfac/``.

Defaults (chosen on the digits demo and in line with the KAISA examples): damping 1e-3 is
small enough to keep the curvature information and large enough to regularise rank-deficient
factors of small batches; factor updates every step and inversions every 10 steps keep the
per-step cost within a small multiple of SGD; decay 0.95 averages the last ~20 factor
estimates; KL clip 1e-3 bounds the step size while the factors are young.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import Callback

from lightning_kfac.engine.preconditioner import KFACPreconditioner
from lightning_kfac.engine.validation import (
    check_decay,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
)

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch.optim import Optimizer

HYPERPARAMETERS = ("damping", "factor_update_freq", "inv_update_freq", "factor_decay", "kl_clip")


class KFACCallback(Callback):
    """Owns the K-FAC hyperparameters and runs the preconditioning step.

    Args:
        damping: Tikhonov damping lambda > 0.
        factor_update_freq: optimizer steps between factor updates (>= 1).
        inv_update_freq: optimizer steps between inversions (>= 1).
        factor_decay: running-average decay in [0, 1).
        kl_clip: KL-clip bound > 0, or None to disable it.
        log: log the hyperparameters and K-FAC figures under ``kfac/``.
    """

    def __init__(
        self,
        damping: float = 1e-3,
        factor_update_freq: int = 1,
        inv_update_freq: int = 10,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        log: bool = True,
    ) -> None:
        self.damping = check_positive_float("damping", damping)
        self.factor_update_freq = check_positive_int("factor_update_freq", factor_update_freq)
        self.inv_update_freq = check_positive_int("inv_update_freq", inv_update_freq)
        self.factor_decay = check_decay("factor_decay", factor_decay)
        self.kl_clip = check_optional_positive_float("kl_clip", kl_clip)
        self.log = bool(log)

    def hyperparameters(self, step: int) -> dict[str, Any]:
        """The values in force at optimizer step ``step``."""
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def apply_to(self, preconditioner: KFACPreconditioner, step: int) -> None:
        for name, value in self.hyperparameters(step).items():
            setattr(preconditioner, name, value)

    @staticmethod
    def _preconditioner(trainer: "pl.Trainer") -> KFACPreconditioner | None:
        return getattr(trainer.strategy, "preconditioner", None)

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        # before the forward pass: the hooks decide from factor_update_freq whether to record
        preconditioner = self._preconditioner(trainer)
        if preconditioner is not None:
            self.apply_to(preconditioner, trainer.global_step)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: "Optimizer") -> None:
        precondition = getattr(trainer.strategy, "precondition", None)
        if precondition is None:
            return
        precondition(optimizer)
        preconditioner = self._preconditioner(trainer)
        if self.log and preconditioner is not None:
            metrics = {f"kfac/{name}": float(value) for name, value in self.hyperparameters(trainer.global_step).items() if value is not None}
            if preconditioner.last_kl_scale is not None:
                metrics["kfac/kl_clip_scale"] = preconditioner.last_kl_scale.float()
            metrics["kfac/comm_bytes"] = float(preconditioner.step_bytes)
            for part, ms in preconditioner.timings_ms.items():
                metrics[f"kfac/time_{part}_ms"] = ms
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    # --- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in HYPERPARAMETERS:
            if name in state_dict:
                setattr(self, name, state_dict[name])
