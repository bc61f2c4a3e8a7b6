"""KFACDDPStrategy: plain DDP plus a distributed K-FAC preconditioner.

Registered as ``"kfac_ddp"``. The preconditioner is built in :meth:`setup` (after DDP wrapped the
module, so ranks and process groups exist), driven once per optimizer step by
:class:`~lightning_kfac.KFACCallback` at ``on_before_optimizer_step`` (gradients are final: DDP
has averaged them, AMP has unscaled them, clipping and ``optimizer.step()`` come after), and
removed in :meth:`teardown`. Its state travels in Lightning checkpoints under ``"kfac"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim import Optimizer

from lightning_kfac.engine import KFACConfig, KFACPreconditioner

if TYPE_CHECKING:
    import pytorch_lightning as pl

CHECKPOINT_KEY = "kfac"


class KFACDDPStrategy(DDPStrategy):
    """DDP with K-FAC preconditioning of every ``nn.Linear`` and ``nn.Conv2d``.

    Structural K-FAC options are fixed here (see :class:`~lightning_kfac.KFACConfig`); the
    per-step hyperparameters (damping, update intervals, decay, KL clip) belong to
    :class:`~lightning_kfac.KFACCallback`, which the strategy adds with its defaults when the
    trainer has none. Every other keyword goes to :class:`~pytorch_lightning.strategies.DDPStrategy`.
    """

    strategy_name = "kfac_ddp"

    def __init__(
        self,
        inverse_method: str = "eigen",
        factor_dtype: str | torch.dtype = "float32",
        inverse_dtype: str | torch.dtype = "float32",
        skip_layers: list[str] | None = None,
        grad_worker_fraction: float = 1.0,
        assignment_cost: str = "compute",
        split_factors: bool = False,
        bucket_cap_mb: float = 25.0,
        comm_dtype: str | torch.dtype | None = None,
        symmetric_comm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kfac_config = KFACConfig(
            inverse_method=inverse_method,
            factor_dtype=factor_dtype,  # type: ignore[arg-type]
            inverse_dtype=inverse_dtype,  # type: ignore[arg-type]
            skip_layers=tuple(skip_layers or ()),
            grad_worker_fraction=grad_worker_fraction,
            assignment_cost=assignment_cost,
            split_factors=split_factors,
            bucket_cap_mb=bucket_cap_mb,
            comm_dtype=comm_dtype,  # type: ignore[arg-type]
            symmetric_comm=symmetric_comm,
        )
        self.preconditioner: KFACPreconditioner | None = None
        self._restored_kfac_state: dict[str, Any] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def connect(self, model: "pl.LightningModule") -> None:
        super().connect(model)
        trainer = getattr(model, "_trainer", None)
        if trainer is not None:
            from lightning_kfac.callback import KFACCallback

            if not any(isinstance(cb, KFACCallback) for cb in trainer.callbacks):
                trainer.callbacks.append(KFACCallback())

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self.preconditioner is not None:
            self.preconditioner.remove()
        self.preconditioner = KFACPreconditioner(self.lightning_module, config=self.kfac_config)
        self.preconditioner.accumulation_steps = trainer.accumulate_grad_batches
        from lightning_kfac.callback import KFACCallback

        for callback in trainer.callbacks:
            if isinstance(callback, KFACCallback):
                callback.apply_to(self.preconditioner, step=trainer.global_step)
                break
        if self._restored_kfac_state is not None:
            self.preconditioner.load_state_dict(self._restored_kfac_state)
            self._restored_kfac_state = None

    def teardown(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove()
            self.preconditioner = None
        super().teardown()

    # --- the step ------------------------------------------------------------------------------
    def precondition(self, optimizer: Optimizer) -> None:
        """Replace the gradients of the K-FAC layers by their preconditioned values.

        Called by :class:`~lightning_kfac.KFACCallback` at ``on_before_optimizer_step``; under
        manual optimization the same hook runs inside ``optimizer.step()``.
        """
        if self.preconditioner is None:
            return
        lr = float(optimizer.param_groups[0]["lr"])
        self.preconditioner.step(lr=lr, grad_scale=self._loss_scale())

    def _loss_scale(self) -> torch.Tensor | None:
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        scale_async = getattr(scaler, "_get_scale_async", None)
        return scale_async() if scale_async is not None else torch.tensor(scaler.get_scale())

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # every rank reaches here (only rank 0 writes), so gathering the owners' factors is safe
        if self.preconditioner is not None:
            checkpoint[CHECKPOINT_KEY] = self.preconditioner.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning restores before setup builds the preconditioner: keep the state until then
        self._restored_kfac_state = checkpoint.get(CHECKPOINT_KEY)
        if self._restored_kfac_state is not None and self.preconditioner is not None:
            self.preconditioner.load_state_dict(self._restored_kfac_state)
            self._restored_kfac_state = None
        return checkpoint


def register(strategy_registry: Any) -> None:
    if KFACDDPStrategy.strategy_name not in strategy_registry:
        strategy_registry.register(
            KFACDDPStrategy.strategy_name,
            KFACDDPStrategy,
            description="DDP with distributed K-FAC preconditioning (lightning_kfac)",
        )
