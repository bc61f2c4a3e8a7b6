"""KFACCallback: the K-FAC hyperparameters of a run (constants or schedules), applied to the
strategy's preconditioner before every step, and what K-FAC is doing, made visible.

* Hyperparameters: ``damping``, ``factor_update_freq``, ``inv_update_freq``, ``factor_decay``
  and ``kl_clip`` each take a constant, a callable of the optimizer step, or a schedule from
  :mod:`lightning_kfac.schedules` (yaml: ``class_path``/``init_args``). They are part of the
  checkpointed state.
* Adaptive mode: ``adaptive=StalenessConfig(...)`` lets each layer's factor-update and
  inversion intervals grow while its factors are stable (:mod:`lightning_kfac.engine.staleness`).
* Logging (every ``log_every_n_steps`` of the trainer, through its loggers): the mean per
  optimizer step since the previous log of K-FAC's host times ``kfac/time_{hooks,factors,
  inverse,precondition,total}_ms`` (hooks: the factor statistics computed in forward and
  backward) and of ``kfac/comm_bytes`` (payload bytes of K-FAC's collectives on this rank), so
  the logs give amortised costs whatever the intervals; ``kfac/kl_clip_scale`` (the applied nu),
  ``kfac/inversions`` (steps that ran an inversion so far), ``kfac/layer_inversions`` (layer
  decompositions so far). The hyperparameters (``kfac/damping``, ``kfac/factor_update_freq``,
  ``kfac/inv_update_freq``, ``kfac/factor_decay``, ``kfac/kl_clip``) go to the loggers'
  hyperparameters at fit start, and into the metrics from the first log at which they differ
  (a schedule). No device synchronisation is added unless ``exact_timings=True`` (which also
  logs ``kfac/time_step_ms``, the synchronised step). The progress-bar items are logged only
  when they change.
* ``diagnostics=True``: per-layer factor traces, condition-number estimates and adaptive
  intervals, on logging steps only.
* A ``kfac_damp``/``kfac_inv`` item in the progress bar and a one-screen summary at fit start.

Defaults (``engine/hyperparameters.py``, the reasons there) are for large global batches; small
batches want damping 0.1 and a KL clip of 0.01 (README "When K-FAC helps, and how to set it").
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_kfac.engine import hyperparameters as rules
from lightning_kfac.engine.preconditioner import KFACPreconditioner
from lightning_kfac.engine.report import TimingWindow, estimated_memory, fit_summary, format_bytes, layer_statistics
from lightning_kfac.engine.staleness import StalenessConfig
from lightning_kfac.schedules import Schedule, as_schedule, schedule_from_state

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch.optim import Optimizer

HYPERPARAMETERS = rules.NAMES
STATE_VERSION = 2

#: what a hyperparameter argument may be: a constant, a callable of the step, or a schedule
FloatSpec = float | Schedule | Callable[[int], float]
IntSpec = int | Schedule | Callable[[int], float]


class KFACCallback(Callback):
    """Owns the K-FAC hyperparameters, runs the preconditioning step and reports on it.

    Args:
        damping: Tikhonov damping lambda > 0 (takes effect at the next inversion).
        factor_update_freq: optimizer steps between factor updates (rounded, >= 1).
        inv_update_freq: optimizer steps between inversions (rounded, >= 1).
        factor_decay: running-average decay in [0, 1).
        kl_clip: KL-clip bound > 0, or None to disable it.
            Each of the five: a constant, a callable of the optimizer step, or a
            :class:`~lightning_kfac.schedules.Schedule` (``Constant``, ``StepDecay``,
            ``ExponentialDecay``, ``LinearWarmup``, ``Cosine``).
        adaptive: a :class:`~lightning_kfac.engine.staleness.StalenessConfig` to let each layer's
            intervals adapt to how fast its factors change (``factor_update_freq`` and
            ``inv_update_freq`` are then the starting intervals); None: fixed intervals.
        log: log the figures under ``kfac/`` through the trainer's loggers.
        diagnostics: also log per-layer factor traces, condition-number estimates and adaptive
            intervals (on logging steps; one small collective there when distributed).
        progress_bar: show ``kfac_damp`` and ``kfac_inv`` (step of the last inversion) in the
            progress bar.
        summary: print the layer/owner/memory summary at fit start (rank zero).
        exact_timings: synchronise the device around the K-FAC step so that the logged times
            are device times (costs a synchronisation per step; off by default).
    """

    def __init__(
        self,
        damping: FloatSpec = rules.DEFAULTS["damping"],
        factor_update_freq: IntSpec = rules.DEFAULTS["factor_update_freq"],
        inv_update_freq: IntSpec = rules.DEFAULTS["inv_update_freq"],
        factor_decay: FloatSpec = rules.DEFAULTS["factor_decay"],
        kl_clip: FloatSpec | None = rules.DEFAULTS["kl_clip"],
        adaptive: StalenessConfig | None = None,
        log: bool = True,
        diagnostics: bool = False,
        progress_bar: bool = True,
        summary: bool = True,
        exact_timings: bool = False,
    ) -> None:
        specs = {
            "damping": damping,
            "factor_update_freq": factor_update_freq,
            "inv_update_freq": inv_update_freq,
            "factor_decay": factor_decay,
            "kl_clip": kl_clip,
        }
        self.schedules: dict[str, Schedule | None] = {}
        for name, spec in specs.items():
            self.schedules[name] = self._make_schedule(name, spec)
        if adaptive is not None and not isinstance(adaptive, StalenessConfig):
            raise TypeError(
                f"adaptive must be a lightning_kfac.engine.staleness.StalenessConfig or None, got {adaptive!r}"
            )
        self.adaptive = adaptive
        for flag, value in (
            ("log", log),
            ("diagnostics", diagnostics),
            ("progress_bar", progress_bar),
            ("summary", summary),
            ("exact_timings", exact_timings),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r} ({type(value).__name__})")
        self.log = log
        self.diagnostics = diagnostics
        self.progress_bar = progress_bar
        self.summary = summary
        self.exact_timings = exact_timings

        #: optimizer steps per epoch, bound from the trainer (for schedules with unit="epoch")
        self.steps_per_epoch: int | None = None
        self.current_epoch = 0
        #: trainer.global_step of the last step that ran an inversion, and how many did
        self.last_inversion_step: int | None = None
        self.inversions = 0
        #: the text printed at fit start
        self.summary_text: str | None = None
        self._cache_key: tuple[int, float | None] | None = None
        self._cache_values: dict[str, Any] = {}
        self._bar_shown: dict[str, Any] | None = None
        self._window = TimingWindow()
        self._logged_values: dict[str, Any] = {}
        self._moving: set[str] = set()

    # --- hyperparameters -------------------------------------------------------------------------
    @staticmethod
    def _make_schedule(name: str, spec: Any) -> Schedule | None:
        if spec is None:
            if name != "kl_clip":
                raise TypeError(f"{name} must be a number, a callable of the step or a schedule, got None")
            return None
        if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
            rules.check(name, spec)
            return as_schedule(name, spec)
        schedule = as_schedule(name, spec)
        for value in schedule.extremes():
            try:
                if rules.RULES[name].integer and value <= 0:
                    raise ValueError(f"{name} must stay > 0 (it is rounded to an integer >= 1), got {value!r}")
                rules.coerce(name, value)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}={schedule!r} reaches a value outside the allowed range: {err}") from None
        return schedule

    def hyperparameters(self, step: int) -> dict[str, Any]:
        """The values in force at optimizer step ``step`` (frequencies as ints >= 1)."""
        epoch = None if self.steps_per_epoch is not None else float(self.current_epoch)
        key = (int(step), epoch)
        if key == self._cache_key:
            return dict(self._cache_values)
        values: dict[str, Any] = {}
        for name, schedule in self.schedules.items():
            if schedule is None:
                values[name] = None
                continue
            raw = schedule(int(step), epoch)
            try:
                values[name] = rules.coerce(name, raw)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name} schedule {schedule!r} gave {raw!r} at step {step}: {err}") from None
        self._cache_key, self._cache_values = key, values
        return dict(values)

    def apply_to(self, preconditioner: KFACPreconditioner, step: int) -> None:
        """Set the hyperparameters of ``step`` (and the adaptive policy) on the preconditioner."""
        for name, value in self.hyperparameters(step).items():
            setattr(preconditioner, name, value)
        if not hasattr(preconditioner, "staleness"):  # an engine without the adaptive mode
            if self.adaptive is not None:
                rank_zero_warn("K-FAC: this engine has no adaptive (stale statistics) mode; using fixed intervals")
        elif preconditioner.staleness != self.adaptive:
            preconditioner.staleness = self.adaptive

    def bind_steps_per_epoch(self, steps_per_epoch: int | None) -> None:
        """Tell the epoch-based schedules how many optimizer steps an epoch has."""
        self.steps_per_epoch = steps_per_epoch
        for schedule in self.schedules.values():
            if schedule is not None:
                schedule.bind(steps_per_epoch)
        self._cache_key = None

    @staticmethod
    def _preconditioner(trainer: pl.Trainer) -> KFACPreconditioner | None:
        return getattr(trainer.strategy, "preconditioner", None)

    def _bind_from_trainer(self, trainer: pl.Trainer) -> None:
        self.current_epoch = int(trainer.current_epoch)
        batches = getattr(trainer, "num_training_batches", None)
        steps = None
        if isinstance(batches, numbers.Real) and math.isfinite(float(batches)) and float(batches) > 0:
            steps = max(1, math.ceil(int(float(batches)) / max(1, int(trainer.accumulate_grad_batches))))
        if steps != self.steps_per_epoch:
            self.bind_steps_per_epoch(steps)
        self._cache_key = None

    # --- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        count = sum(isinstance(cb, KFACCallback) for cb in trainer.callbacks)  # type: ignore[attr-defined]
        if count > 1:
            raise ValueError(
                f"the Trainer has {count} KFACCallbacks: use one (it holds every K-FAC hyperparameter and its "
                "schedule; two would set the same preconditioner twice per step)"
            )
        if stage == "fit" and getattr(trainer.strategy, "precondition", None) is None:
            raise ValueError(
                f"KFACCallback needs the K-FAC strategy, but the Trainer's strategy is "
                f"{type(trainer.strategy).__name__}: use Trainer(strategy='kfac_ddp', ...) (or "
                "lightning_kfac.KFACDDPStrategy(...)), or remove the KFACCallback to train without K-FAC"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        preconditioner = self._preconditioner(trainer)
        if preconditioner is None:
            return
        if self.exact_timings:
            preconditioner.sync_timings = True
        self._window.reset(preconditioner)
        self._logged_values = {name: getattr(preconditioner, name) for name in HYPERPARAMETERS}
        self._moving = set()
        if self.log:
            hparams = {f"kfac/{k}": v for k, v in self._logged_values.items() if v is not None}
            for logger in trainer.loggers:
                logger.log_hyperparams(hparams)
        if self.summary:
            self.summary_text = fit_summary(preconditioner, self.hyperparameters(trainer.global_step), self.adaptive)
            rank_zero_info(self.summary_text)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_from_trainer(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_from_trainer(trainer)
        self._bar_shown = None  # Lightning resets logged values between epochs: show them again

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # before the forward pass: the hooks decide from factor_update_freq whether to record
        preconditioner = self._preconditioner(trainer)
        if preconditioner is not None:
            self.apply_to(preconditioner, trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        precondition = getattr(trainer.strategy, "precondition", None)
        if precondition is None:
            return
        preconditioner = self._preconditioner(trainer)
        start = 0.0
        if self.exact_timings:
            _synchronize(pl_module.device)
            start = time.perf_counter()
        precondition(optimizer)
        step_ms = None
        if self.exact_timings:
            _synchronize(pl_module.device)
            step_ms = (time.perf_counter() - start) * 1e3
        if preconditioner is None:
            return
        self._window.add_synced(step_ms)
        # the engine counts; kept here too so that they outlive the fit (and its checkpoints)
        self.inversions = preconditioner.inversions
        self.last_inversion_step = preconditioner.last_inversion_step
        # Lightning's self.log costs a few hundred microseconds per key: log on the steps the
        # loggers write (and the last one, for callback_metrics), not on every step
        log_now = _should_log(trainer) or _is_last_step(trainer)
        if self.log and log_now:
            self._log_step(pl_module, preconditioner, step_ms)
        if self.progress_bar:
            self._log_progress_bar(pl_module, preconditioner)
        if self.diagnostics and log_now:
            self._log_diagnostics(pl_module, preconditioner)

    # --- logging ---------------------------------------------------------------------------------
    def _log_progress_bar(self, pl_module: pl.LightningModule, pre: KFACPreconditioner) -> None:
        # only when a value changed (Lightning keeps showing the last one): the damping when its
        # schedule moves, the inversion step once per inversion
        if self.last_inversion_step is not None:
            # a step number, shown as one: logged values reach the bar as floats ("16.00"), so it
            # goes straight into the trainer's progress-bar dict, which the bar reads
            pl_module.trainer.progress_bar_metrics["kfac_inv"] = int(self.last_inversion_step)
        bar = {"kfac_damp": float(pre.damping)}
        if bar == self._bar_shown:
            return
        self._bar_shown = bar
        damping = torch.tensor(bar["kfac_damp"], dtype=torch.float64)
        pl_module.log(
            "kfac_damp",
            damping,
            prog_bar=True,
            logger=False,
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
            batch_size=1,
        )

    def _log_step(self, pl_module: pl.LightningModule, pre: KFACPreconditioner, step_ms: float | None) -> None:
        """Per optimizer step since the previous log: mean times and bytes (so that the logs give
        amortised costs whatever the intervals); counters; the hyperparameters when they change."""
        window = self._window.advance(pre, step_ms)
        # host values go in as CPU tensors: Lightning keeps them on the CPU (no device copy or
        # sync per step); the only device tensor is the KL scale, read when the logger writes
        cpu = {f"kfac/{key}": value for key, value in window.items()}
        cpu["kfac/inversions"] = float(pre.inversions)
        cpu["kfac/layer_inversions"] = float(pre.layer_inversions)
        # the values at fit start went to the loggers' hyperparameters; one that changed since
        # (a schedule) is logged from then on (Lightning repeats a key once it was logged)
        for name in HYPERPARAMETERS:
            value = getattr(pre, name)
            if value is not None and (name in self._moving or self._logged_values.get(name) != value):
                self._moving.add(name)
                cpu[f"kfac/{name}"] = float(value)
        metrics: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float64) for k, v in cpu.items()}
        if pre.last_kl_scale is not None:
            metrics["kfac/kl_clip_scale"] = pre.last_kl_scale.detach()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    def _log_diagnostics(self, pl_module: pl.LightningModule, pre: KFACPreconditioner) -> None:
        stats = layer_statistics(pre)
        metrics: dict[str, torch.Tensor] = {}
        for name, values in stats.items():
            for key, value in values.items():
                metrics[f"kfac/{name}/{key}"] = torch.tensor(value, dtype=torch.float64)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    # --- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Schedules, adaptive policy and counters: Python scalars and lists only."""
        return {
            "version": STATE_VERSION,
            "schedules": {name: (s.state_dict() if s is not None else None) for name, s in self.schedules.items()},
            "adaptive": asdict(self.adaptive) if self.adaptive is not None else None,
            "steps_per_epoch": self.steps_per_epoch,
            "last_inversion_step": self.last_inversion_step,
            "inversions": self.inversions,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "schedules" not in state_dict:  # the first format: the five values
            state_dict = {"schedules": {n: _constant_state(state_dict[n]) for n in HYPERPARAMETERS if n in state_dict}}
        for name, saved in state_dict["schedules"].items():
            if name not in self.schedules:
                continue
            current = self.schedules[name]
            if saved is None:
                restored = None
            elif saved.get("class") is None:  # a callable: code is not checkpointed, keep ours
                if current is None or not callable(getattr(current, "fn", None)):
                    rank_zero_warn(
                        f"K-FAC: the checkpoint's {name} was a Python callable ({saved.get('callable')}), which "
                        f"checkpoints cannot hold; keeping this callback's {current!r}"
                    )
                continue
            else:
                restored = schedule_from_state(saved)
                if restored is None:
                    rank_zero_warn(
                        f"K-FAC: unknown schedule class {saved.get('class')!r} for {name} in the checkpoint; "
                        f"keeping {current!r}"
                    )
                    continue
            if restored != current:
                rank_zero_info(
                    f"K-FAC: {name} restored from the checkpoint: {restored!r} (this callback had {current!r})"
                )
            self.schedules[name] = restored
        if "adaptive" in state_dict:
            saved_adaptive, restored_adaptive = state_dict["adaptive"], None
            if saved_adaptive is not None:
                restored_adaptive, unknown = StalenessConfig.from_state(saved_adaptive)
                if unknown:
                    rank_zero_warn(f"K-FAC: ignoring adaptive settings this version does not know: {unknown}")
            if restored_adaptive != self.adaptive:
                rank_zero_info(
                    f"K-FAC: adaptive policy restored from the checkpoint: {restored_adaptive!r} "
                    f"(this callback had {self.adaptive!r})"
                )
            self.adaptive = restored_adaptive
        if state_dict.get("steps_per_epoch") is not None:
            self.bind_steps_per_epoch(int(state_dict["steps_per_epoch"]))
        if "last_inversion_step" in state_dict:
            last = state_dict["last_inversion_step"]
            self.last_inversion_step = None if last is None else int(last)
        self.inversions = int(state_dict.get("inversions", self.inversions))
        self._cache_key = None


# --- helpers ------------------------------------------------------------------------------------
def _constant_state(value: Any) -> dict[str, Any] | None:
    return None if value is None else as_schedule("value", value).state_dict()


def _synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync()


def _should_log(trainer: pl.Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    try:
        return bool(connector.should_update_logs)  # type: ignore[union-attr]
    except Exception:
        n = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning at runtime
        return n > 0 and (trainer.global_step + 1) % n == 0


def _is_last_step(trainer: pl.Trainer) -> bool:
    """Is the optimizer step being taken the last of the fit (as far as known in advance)?"""
    if trainer.should_stop or getattr(trainer, "fast_dev_run", False):
        return True
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    batches = trainer.num_training_batches
    if max_epochs is None or max_epochs < 0 or not isinstance(batches, int) or trainer.current_epoch + 1 < max_epochs:
        return False
    try:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    except AttributeError:
        return False
    return ready >= batches


__all__ = ["KFACCallback", "estimated_memory", "fit_summary", "format_bytes", "layer_statistics"]
