"""KFACDDPStrategy: plain DDP plus a distributed K-FAC preconditioner.

Registered as ``"kfac_ddp"``. The preconditioner is built in :meth:`setup` (after DDP wrapped the
module, so ranks and process groups exist), driven once per optimizer step by
:class:`~lightning_kfac.KFACCallback` at ``on_before_optimizer_step`` through
:meth:`~KFACDDPStrategy.precondition` (gradients are final there: accumulated over the
micro-batches, averaged by DDP, unscaled by AMP; clipping and ``optimizer.step()`` come after),
and removed in :meth:`teardown`. Its state travels in Lightning checkpoints under ``"kfac"``.

What the strategy adds around the engine, so that Lightning's features keep working:

* ``accumulate_grad_batches=k``: the hooks record every micro-batch, the factors are combined so
  that k micro-batches of B/k give the factors of one batch of B, and K-FAC steps (and
  communicates) once per optimizer step. A shorter last window of an epoch (m < k micro-batches)
  gets the factors of one batch of m*B/k (G is the mean over the backward passes that reached
  each layer).
* ``precision="16-mixed"``: G is corrected by the grad scaler's scale; a step the scaler skips
  (inf/NaN gradients) updates no factor, no running average and no decomposition.
* Evaluation (sanity check, validation, test, predict) never records factors nor starts a
  collective, whatever mode the module is in.
* Manual optimization: ``opt.step()`` on the optimizer from ``self.optimizers()`` preconditions;
  a raw ``torch.optim`` step on gradients K-FAC has not seen raises instead of silently
  skipping K-FAC.

The logic lives in :class:`_KFACStrategyBase`, mixed into the ``DDPStrategy`` of one Lightning
namespace: :class:`KFACDDPStrategy` here for ``pytorch_lightning``, and
``lightning_kfac.lightning_pytorch.KFACDDPStrategy`` for ``lightning.pytorch``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.optim import Optimizer

from lightning_kfac.callback import KFACCallback
from lightning_kfac.engine import KFACConfig, KFACPreconditioner

if TYPE_CHECKING:
    import pytorch_lightning as pl

CHECKPOINT_KEY = "kfac"


class _KFACStrategyBase:
    """K-FAC on top of a Lightning ``DDPStrategy`` (mixed in before it; namespace-agnostic)."""

    strategy_name = "kfac_ddp"

    def __repr__(self) -> str:
        # Lightning's "invalid strategy" error prints the repr of an object from the other
        # namespace's Trainer; this makes that message name the class that fits it
        lightning_pytorch = type(self).__module__ != __name__
        own, other = (
            ("lightning.pytorch", "pytorch_lightning")
            if lightning_pytorch
            else ("pytorch_lightning", "lightning.pytorch")
        )
        fix = (
            "lightning_kfac.KFACDDPStrategy"
            if lightning_pytorch
            else "lightning_kfac.lightning_pytorch.KFACDDPStrategy"
        )
        return f"<KFACDDPStrategy for {own}'s Trainer; in {other}'s Trainer use {fix}, or the string 'kfac_ddp'>"

    def __init__(
        self,
        inverse_method: str = "cholesky",
        damping_mode: str = "factored",
        factor_dtype: str | torch.dtype = "float32",
        inverse_dtype: str | torch.dtype = "float32",
        skip_layers: list[str] | None = None,
        grad_worker_fraction: float = 1.0,
        assignment_cost: str = "compute",
        split_factors: bool = False,
        kfac_bucket_cap_mb: float = 25.0,
        comm_dtype: str | torch.dtype | None = None,
        symmetric_comm: bool = True,
        overlap_factor_comm: bool = True,
        cpu_threads: int | None = 1,
        factor_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        """K-FAC's structural options (the ``Args`` of the class docstring, which jsonargparse
        shows in ``--help``); every other keyword is DDPStrategy's."""
        super().__init__(**kwargs)
        self.kfac_config = KFACConfig(
            inverse_method=inverse_method,
            damping_mode=damping_mode,
            factor_dtype=factor_dtype,  # type: ignore[arg-type]
            inverse_dtype=inverse_dtype,  # type: ignore[arg-type]
            skip_layers=tuple(skip_layers or ()),
            grad_worker_fraction=grad_worker_fraction,
            assignment_cost=assignment_cost,
            split_factors=split_factors,
            bucket_cap_mb=kfac_bucket_cap_mb,
            comm_dtype=comm_dtype,  # type: ignore[arg-type]
            symmetric_comm=symmetric_comm,
            overlap_factor_comm=overlap_factor_comm,
            cpu_threads=cpu_threads,
            factor_samples=factor_samples,
        )
        self.preconditioner: KFACPreconditioner | None = None
        # the last fit's preconditioner, hooks removed: trainer.save_checkpoint after fit
        # writes its state
        self._finished_preconditioner: KFACPreconditioner | None = None
        self._restored_kfac_state: dict[str, Any] | None = None
        self._step_hook_handles: list[Any] = []
        # True once precondition() has handled the current gradients; reset by a backward pass
        # and after optimizer.step(): precondition() is idempotent in between
        self._preconditioned = False
        # backward passes since the last K-FAC step (micro-batches of the accumulation window)
        self._backward_passes = 0
        #: optimizer steps K-FAC discarded (AMP overflow, skipped backward), for inspection
        self.discarded_steps = 0

    # --- namespace ---------------------------------------------------------------------------
    @classmethod
    def _callback_class(cls) -> type:
        """The KFACCallback of this strategy's Lightning namespace (added when none is given)."""
        return KFACCallback

    # --- lifecycle -----------------------------------------------------------------------------
    def connect(self, model: Any) -> None:
        super().connect(model)  # type: ignore[misc]
        trainer = getattr(model, "_trainer", None)
        # the lightning.pytorch callback derives from this one
        if trainer is not None and not any(isinstance(cb, KFACCallback) for cb in trainer.callbacks):
            trainer.callbacks.append(self._callback_class()())

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)  # type: ignore[misc]
        if trainer.state.fn != "fit":
            # validate/test/predict: no preconditioner, no hooks; a checkpoint they loaded must
            # not leak into a later fit
            self._restored_kfac_state = None
            return
        module = self.lightning_module  # type: ignore[attr-defined]
        self._check_optimizers()
        if self.preconditioner is not None:
            self.preconditioner.remove()
        self._finished_preconditioner = None
        self.preconditioner = KFACPreconditioner(module, config=self.kfac_config)
        self.preconditioner.accumulation_steps = max(1, int(trainer.accumulate_grad_batches))
        self.preconditioner.recording = False  # until the first training batch
        self._preconditioned = False
        self._backward_passes = 0
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning at runtime
            if isinstance(callback, KFACCallback):  # either namespace's
                callback.apply_to(self.preconditioner, step=trainer.global_step)
                break
        if self._restored_kfac_state is not None:
            _restore_state(self.preconditioner, self._restored_kfac_state)
            self._restored_kfac_state = None
        for optimizer in self.optimizers:  # type: ignore[attr-defined]
            self._step_hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _check_optimizers(self) -> None:
        optimizers = list(self.optimizers)  # type: ignore[attr-defined]
        if len(optimizers) > 1:
            raise ValueError(
                f"kfac_ddp supports one optimizer; configure_optimizers returned {len(optimizers)}. K-FAC "
                "preconditions every nn.Linear/nn.Conv2d of the LightningModule once per optimizer step, "
                "so several optimizers (e.g. a GAN's) would precondition and record each other's layers. "
                "Use one optimizer (with parameter groups), or strategy='ddp' for this module."
            )
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise ValueError(
                    "kfac_ddp does not support torch.optim.LBFGS: its closure runs several forward/backward "
                    "passes per step, which K-FAC would record as one batch. Use a first-order optimizer "
                    "(SGD, Adam, ...) under K-FAC."
                )

    def teardown(self) -> None:
        for handle in self._step_hook_handles:
            handle.remove()
        self._step_hook_handles.clear()
        if self.preconditioner is not None:
            self.preconditioner.remove()
            self._finished_preconditioner = self.preconditioner
            self.preconditioner = None
        super().teardown()  # type: ignore[misc]

    # --- what records and what does not --------------------------------------------------------
    def _set_recording(self, value: bool) -> None:
        if self.preconditioner is not None:
            self.preconditioner.recording = value

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        pre = self.preconditioner
        if pre is None:
            return
        pre.recording = True
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is not None and module.automatic_optimization:
            # GradientAccumulationScheduler may change it between epochs
            pre.accumulation_steps = max(1, int(module.trainer.accumulate_grad_batches))

    def on_train_end(self) -> None:
        self._set_recording(False)
        super().on_train_end()  # type: ignore[misc]

    def on_validation_start(self) -> None:
        # sanity check and validation: nothing is recorded, even by a module in train mode with
        # gradients enabled; the next training batch switches recording back on
        self._set_recording(False)
        super().on_validation_start()  # type: ignore[misc]

    def on_test_start(self) -> None:
        self._set_recording(False)
        super().on_test_start()  # type: ignore[misc]

    def on_predict_start(self) -> None:
        self._set_recording(False)
        super().on_predict_start()  # type: ignore[misc]

    # --- the step ------------------------------------------------------------------------------
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._preconditioned = False
        self._backward_passes += 1
        return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]

    def precondition(self, optimizer: Optimizer) -> None:
        """Replace the gradients of the K-FAC layers by their preconditioned values, once per
        optimizer step (a second call before ``optimizer.step()`` does nothing).

        :class:`~lightning_kfac.KFACCallback` calls it at ``on_before_optimizer_step``, which
        also runs inside ``opt.step()`` under manual optimization. Call it yourself only before
        a raw ``torch.optim`` step (``self.optimizers(use_pl_optimizer=False)``).
        """
        pre = self.preconditioner
        if pre is None or self._preconditioned:
            return
        self._preconditioned = True
        micro_batches, self._backward_passes = self._backward_passes, 0
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        module = self.lightning_module  # type: ignore[attr-defined]
        automatic = module is None or module.automatic_optimization
        if automatic and micro_batches == 0:
            # training_step returned None: Lightning skips the backward and the optimizer step
            self._discard_step(pre)
            return
        scaler = self._scaler()
        grad_scale: float | None = None
        if scaler is not None:
            if _unscales_in_step(optimizer):
                raise RuntimeError(
                    "kfac_ddp with precision='16-mixed' needs the gradients unscaled before the optimizer "
                    "step; this optimizer unscales inside its step() (e.g. fused=True), which K-FAC cannot "
                    "precondition. Use the optimizer with fused=False, or precision='bf16-mixed'."
                )
            if not _gradients_finite(optimizer):
                self._discard_step(pre)  # the scaler skips this optimizer step
                return
            grad_scale = float(scaler.get_scale())
        lr = float(optimizer.param_groups[0]["lr"])
        pre.step(lr=lr, grad_scale=grad_scale)

    def _discard_step(self, pre: KFACPreconditioner) -> None:
        """This step's optimizer step will not happen: drop what the hooks recorded (finishing
        any factor exchange already in flight, so that every rank's collectives stay matched),
        touch no factor, and count the step so the update intervals stay on Lightning's
        ``global_step``."""
        self.discarded_steps += 1
        pre.skip_step()

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """``register_step_post_hook`` on every optimizer: stop at a step K-FAC never saw. (A
        post-hook, because in automatic optimization the closure, and with it the
        preconditioning, runs inside ``optimizer.step()``.)"""
        pre = self.preconditioner
        if pre is not None and not self._preconditioned:
            raise RuntimeError(
                "kfac_ddp: optimizer.step() just ran on gradients K-FAC had not preconditioned. Under manual "
                "optimization step the optimizer returned by self.optimizers() (K-FAC runs inside its "
                "step()), or call self.trainer.strategy.precondition(optimizer) right before a raw "
                "torch optimizer's step()."
            )
        self._preconditioned = False

    def _scaler(self) -> Any:
        scaler = getattr(self.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # every rank reaches here (only rank 0 writes), so gathering the owners' factors is safe;
        # after fit (trainer.save_checkpoint) the finished run's state is the one to keep
        pre = self.preconditioner or self._finished_preconditioner
        if pre is not None:
            checkpoint[CHECKPOINT_KEY] = pre.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        # Lightning restores before setup builds the preconditioner: keep the state until then
        self._restored_kfac_state = checkpoint.get(CHECKPOINT_KEY)
        trainer = getattr(self.lightning_module, "_trainer", None)  # type: ignore[attr-defined]
        if self._restored_kfac_state is None and trainer is not None and trainer.state.fn == "fit":
            warnings.warn(
                f"kfac_ddp: the checkpoint {checkpoint_path} holds no K-FAC state (saved by another strategy, "
                "or by trainer.save_checkpoint in a version that lost it after fit); K-FAC starts its factors afresh",
                stacklevel=2,
            )
        if self._restored_kfac_state is not None and self.preconditioner is not None:
            _restore_state(self.preconditioner, self._restored_kfac_state)
            self._restored_kfac_state = None
        return checkpoint


class KFACDDPStrategy(_KFACStrategyBase, DDPStrategy):
    """DDP with K-FAC preconditioning of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``.

    Structural K-FAC options are fixed here (see :class:`~lightning_kfac.KFACConfig`; the size of
    K-FAC's fused factor buckets is ``kfac_bucket_cap_mb``, so that ``bucket_cap_mb`` stays
    DDP's); the per-step hyperparameters (damping, update intervals, decay, KL clip) belong to
    :class:`~lightning_kfac.KFACCallback`, which the strategy adds with its defaults when the
    trainer has none. Every other keyword goes to
    :class:`~pytorch_lightning.strategies.DDPStrategy`.

    Args:
        inverse_method: "cholesky" (damped inverses; factored damping only; cheaper) or
            "eigen" (eigendecompositions; either damping).
        damping_mode: "factored" (Tikhonov damping of each factor, pi-balanced) or "exact"
            (damping of the Kronecker product; eigen only; slower to converge at large batches).
        factor_dtype: dtype of the running factors: "float32", "bfloat16", "float16", "float64".
        inverse_dtype: dtype of the decompositions: "float32" or "float64".
        skip_layers: module names or regular expressions (full match on the name or the class
            name) of layers to leave to their plain gradient.
        grad_worker_fraction: fraction of ranks that precondition each layer, in (0, 1]: 1 is
            COMM-OPT, 1/world_size MEM-OPT, between HYBRID; must give a divisor of the world size.
        assignment_cost: what the owner assignment balances: "compute" (n^3) or "memory" (n^2).
        split_factors: let A and G of a layer have different owners (eigen, fraction 1 only).
        kfac_bucket_cap_mb: size cap of one fused K-FAC collective, in MiB (> 0).
        comm_dtype: dtype factors travel in ("bfloat16", "float16", "float32"), or None for
            the dtype of the factor sums.
        symmetric_comm: send symmetric factors as upper triangles (about half the bytes).
        overlap_factor_comm: launch factor reductions from the backward hooks as layers finish.
        cpu_threads: intra-op CPU threads of K-FAC's own work (>= 1; the same results on any
            node layout), or None for torch's setting.
        factor_samples: at most this many samples per layer call enter A and G (an unbiased
            random subsample; >= 1), or None for all.
    """


def _restore_state(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    """Load a checkpoint's K-FAC state and put it in force now (called on every rank, from setup
    or load_checkpoint).

    The engine keeps a state loaded before its first step until the work plan exists, and builds
    the plan at the first step that records factors. A run resumed at a step that records
    nothing (``factor_update_freq > 1``) would then take that step without the restored
    decompositions. So the plan is built here, from the layers the checkpoint holds factors for
    (the layers whose hooks fired in the saved run); that also applies the state.
    """
    pre.load_state_dict(state)
    pre.build_plan_from_state()


def _unscales_in_step(optimizer: Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()`` (Lightning's MixedPrecision then leaves the
    gradients scaled, the same rule it applies itself)."""
    return bool(getattr(optimizer, "defaults", {}).get("fused"))


def _gradients_finite(optimizer: Optimizer) -> bool:
    """Whether every gradient of ``optimizer`` is finite after unscaling: the grad scaler skips
    the step otherwise. Public API only (one pass over the gradients and one host read, under
    16-mixed alone)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    flags = torch.stack([torch.isfinite(g).all() for g in grads])
    return bool(flags.all())


#: the strings a Trainer accepts, as for Lightning's own "ddp" family: name -> DDP keywords
STRATEGY_ALIASES: dict[str, dict[str, Any]] = {
    "kfac_ddp": {},
    "kfac_ddp_find_unused_parameters_true": {"find_unused_parameters": True},
    "kfac_ddp_find_unused_parameters_false": {"find_unused_parameters": False},
    "kfac_ddp_spawn": {"start_method": "spawn"},
    "kfac_ddp_notebook": {"start_method": "fork"},
}


def register(strategy_registry: Any, strategy_class: type[_KFACStrategyBase] = KFACDDPStrategy) -> None:
    """Register ``"kfac_ddp"`` and its aliases in one namespace's ``StrategyRegistry`` (once)."""
    for name, keywords in STRATEGY_ALIASES.items():
        if name not in strategy_registry:
            detail = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
            description = (
                f"DDP with distributed K-FAC preconditioning (lightning_kfac){f', {detail}' if detail else ''}"
            )
            strategy_registry.register(name, strategy_class, description=description, **keywords)
