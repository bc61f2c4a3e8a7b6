"""KFACPreconditioner: wires the parts and runs one K-FAC step in the order of ``docs/design.md``.

    hooks (Recorder)   forward: sum a a^T of the layer input; backward: sum B gy gy^T
    step():
      factors          due layers' sums reduced to their owners, weighted by rows (Exchange)
                       -> owners' running averages (CurvatureBlock.update)
      inversion        owners decompose (CurvatureBlock.decompose) -> gradient workers
      precondition     gradient workers: V' from V = p.grad -> the other ranks; KL clip
                       -> written into p.grad; any torch optimizer then steps

Usable in a plain loop (``loss.backward(); preconditioner.step(); optimizer.step()``); the
Lightning strategy drives the same object.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.distributed.assignment import WorkPlan
from lightning_kfac.distributed.comm import world_info
from lightning_kfac.distributed.exchange import Exchange, LocalExchange, ensure_group_exchange
from lightning_kfac.engine import curvature, hyperparameters, phases, report, state
from lightning_kfac.engine.blocks.base import CurvatureBlock
from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.layers import KFACLayer, SkippedLayer, register_layers
from lightning_kfac.engine.notices import warn
from lightning_kfac.engine.recorder import Recorder
from lightning_kfac.engine.roster import LayerRoster
from lightning_kfac.engine.scheduling import FixedSchedule, make_schedule
from lightning_kfac.engine.staleness import LayerStaleness, StalenessConfig


def _hyperparameter(name: str) -> property:
    def get(self: KFACPreconditioner) -> Any:
        return getattr(self.hyperparameters, name)

    def put(self: KFACPreconditioner, value: Any) -> None:
        setattr(self.hyperparameters, name, value)

    return property(get, put, doc=hyperparameters.RULES[name].doc)


#: what timings_ms holds, in the order of a step
TIMED_PARTS = ("hooks", "factors", "inverse", "precondition", "total")


class KFACPreconditioner:
    """Kronecker-factored preconditioning of every supported layer of ``model``.

    Args:
        model: the module to precondition (hooks on its ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
            ``nn.Embedding`` layers, frozen or not).
        damping, factor_update_freq, inv_update_freq, factor_decay, kl_clip: the
            hyperparameters (``engine/hyperparameters.py``); they may change between steps.
        lr: learning rate for KL clipping when :meth:`step` is not given one (a number or a
            callable returning it).
        config: structural options (:class:`KFACConfig`); or pass its fields as keywords.
    """

    damping = _hyperparameter("damping")
    factor_update_freq = _hyperparameter("factor_update_freq")
    inv_update_freq = _hyperparameter("inv_update_freq")
    factor_decay = _hyperparameter("factor_decay")
    kl_clip = _hyperparameter("kl_clip")

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = hyperparameters.DEFAULTS["damping"],
        factor_update_freq: int = hyperparameters.DEFAULTS["factor_update_freq"],
        inv_update_freq: int = hyperparameters.DEFAULTS["inv_update_freq"],
        factor_decay: float = hyperparameters.DEFAULTS["factor_decay"],
        kl_clip: float | None = hyperparameters.DEFAULTS["kl_clip"],
        lr: float | Callable[[], float] | None = None,
        config: KFACConfig | None = None,
        **config_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = _make_config(config, config_kwargs)
        self.hyperparameters = hyperparameters.Hyperparameters(
            damping=damping, factor_update_freq=factor_update_freq, inv_update_freq=inv_update_freq,
            factor_decay=factor_decay, kl_clip=kl_clip,
        )  # fmt: skip
        self.lr = lr
        self.steps = 0
        self.rank, self.world_size = world_info()
        self._model = weakref.ref(model)
        layers, skipped = register_layers(model, self.config.skip_layers)
        make_block, config = self.config.block_class, self.config
        self.blocks: dict[str, CurvatureBlock] = {n: make_block(layer, *config.dtypes) for n, layer in layers.items()}
        workers = config.grad_workers_per_layer(self.world_size)
        plan = WorkPlan.build([], self.world_size, workers, config.assignment_cost, config.split_factors)
        self.roster = LayerRoster(layers, skipped, plan)
        self.recorder = self._make_recorder(layers)
        self.exchange: Exchange = LocalExchange()
        self.schedule: FixedSchedule = FixedSchedule(self.hyperparameters)
        self._due_cache: tuple[int, frozenset[str]] | None = None
        self._removed = False
        #: steps that inverted at least one layer, layer inversions in total, and the step of the
        #: last inversion (the same on every rank)
        self.inversions, self.layer_inversions = 0, 0
        self.last_inversion_step: int | None = None
        #: synchronise the device around each phase so timings_ms are device times (slower)
        self.sync_timings = False
        self.last_kl_scale: Tensor | None = None
        #: decompositions that failed (also after a float64 retry); factor updates dropped as
        #: non-finite (read at inversions, no extra synchronisation)
        self.decomposition_failures = 0
        self.nonfinite_factor_updates = 0
        #: the damping was compared with the factors' scale (at the first inversion)
        self.damping_checked = False
        self._warned_nonfinite: set[str] = set()
        #: milliseconds of the last step per part of TIMED_PARTS, and totals since construction
        #: (host time unless sync_timings)
        self.timings_ms: dict[str, float] = dict.fromkeys(TIMED_PARTS, 0.0)
        self.timing_totals_ms: dict[str, float] = dict.fromkeys(TIMED_PARTS, 0.0)
        self.step_bytes = 0

    def _make_recorder(self, layers: dict[str, Any]) -> Recorder:
        # float16 factors are summed in float32: products of loss-scaled gradients overflow it;
        # the recorder calls back weakly, so the model's hooks never keep this object alive
        config = self.config
        sum_dtype = torch.float32 if config.factor_dtype == torch.float16 else config.factor_dtype
        is_due, first_record, on_output_grad = (
            _weak(m) for m in (self._is_due, self._first_record, self.exchange_on_output_grad)
        )
        return Recorder(
            layers,
            sum_dtype,
            config.cpu_threads,
            is_due,
            first_record,
            on_output_grad,
            config.factor_samples,
            self.rank,
        )

    # --- settings ------------------------------------------------------------------------------
    @property
    def accumulation_steps(self) -> int:
        """k when each loss was divided by the number k of accumulated micro-batches."""
        return self.recorder.accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self.recorder.accumulation_steps = max(1, int(value))

    @property
    def recording(self) -> bool:
        """When False the hooks record nothing (evaluation loops, sanity checks)."""
        return self.recorder.recording

    @recording.setter
    def recording(self, value: bool) -> None:
        self.recorder.recording = bool(value)

    @property
    def staleness(self) -> StalenessConfig | None:
        """Adaptive per-layer intervals (stale statistics), or None for the global intervals."""
        return self.schedule.config

    @staleness.setter
    def staleness(self, value: StalenessConfig | None) -> None:
        if value != self.schedule.config:
            schedule = make_schedule(value, self.hyperparameters, self.config.inverse_dtype, self.config.split_factors)
            self.schedule.sync()
            schedule.load_last_updates(self.schedule.last_updates(), self.steps, [])
            self.schedule = schedule
            for name in self.blocks:
                self.schedule.join(name, self.steps)
            self._due_cache = None

    # --- introspection (report.py has the longer ones) -------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        return self._model()

    @property
    def plan(self) -> WorkPlan:
        """Owners and gradient workers of the layers that have recorded (the same on every rank)."""
        return self.roster.plan

    @property
    def layers(self) -> dict[str, KFACLayer]:
        """Registered layers, less those reported as never firing."""
        return self.roster.active()

    @property
    def skipped(self) -> list[SkippedLayer]:
        return self.roster.skipped

    @property
    def staleness_states(self) -> dict[str, LayerStaleness]:
        return self.schedule.trackers

    @property
    def has_factors(self) -> bool:
        return any(b.has_factors for b in self.blocks.values())

    @property
    def has_inverse(self) -> bool:
        return any(b.inversions > 0 for b in self.blocks.values())

    def recorded_anything(self) -> bool:
        return self.recorder.anything_recorded()

    def factors(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """The running (A, G) of every layer, as far as this rank holds them (owners only)."""
        return {n: (b.running_a, b.running_g) for n, b in self.blocks.items()}

    # reports, as methods (engine/report.py)
    prospective_plan = report.prospective_plan
    first_order_parameters = report.first_order_parameters
    decompositions = report.decompositions
    memory_usage = report.memory_usage

    def frozen_layers(self) -> list[SkippedLayer]:
        return self.roster.frozen()

    def bytes_by_kind(self) -> dict[str, int]:
        return self.exchange.bytes_by_kind()

    # --- what is due -----------------------------------------------------------------------------
    def due_factor_layers(self) -> frozenset[str]:
        """Layers whose factors are updated at this step (the same set on every rank): those the
        schedule picks, and trainable layers without factors (they record from their first
        training step)."""
        if self._due_cache is None or self._due_cache[0] != self.steps:
            self.schedule.sync()
            due = {n for n in self.blocks if self.schedule.factors_due(n, self.steps)}
            due.update(n for n in self.roster.waiting() if not self.blocks[n].has_factors)
            due.update(
                n for n in self.roster.planned() if not self.blocks[n].has_factors and self.blocks[n].layer.trains
            )
            self._due_cache = (self.steps, frozenset(due))
        return self._due_cache[1]

    def _is_due(self, name: str) -> bool:
        return name in self.due_factor_layers()

    def _first_record(self) -> None:
        if self.config.overlap_factor_comm and self.plan.a_owner:
            due = self.due_factor_layers()
            names = [n for n in reversed(self.roster.planned()) if n in due]  # backward runs roughly in reverse
            self.exchange.begin_factor_step(names, self.plan, self.recorder)

    def exchange_on_output_grad(self) -> None:
        self.exchange.on_output_grad()

    # --- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float | None = None, grad_scale: float | Tensor | None = None) -> None:
        """Precondition the gradients in place. Call after backward (and DDP's all-reduce),
        before the optimizer step.

        Args:
            lr: learning rate for KL clipping (defaults to the constructor's ``lr``).
            grad_scale: factor the output gradients were multiplied by (an AMP loss scale);
                the G factors are divided by its square.
        """
        if self.blocks and not self._removed:
            with curvature.intra_op_threads(self.config.cpu_threads):
                self._step(lr, grad_scale)
        self._end_step()

    def _step(self, lr: float | None, grad_scale: float | Tensor | None) -> None:
        self.exchange = ensure_group_exchange(
            self.exchange, self.plan, self.rank, self.config, self.recorder.accumulate_dtype, grad_scale
        )
        bytes_before = self.exchange.total_bytes() - self.step_bytes  # hooks' buckets count too
        marks = [self._clock()]
        due = self.due_factor_layers()
        if due:
            phases.update_factors(self, due, grad_scale)
        marks.append(self._clock())
        inverting = [n for n in self.roster.planned() if phases.inversion_due(self, n)]
        if inverting:
            phases.invert(self, inverting)
        marks.append(self._clock())
        ready = [n for n in self.roster.planned() if self.blocks[n].ready]
        if ready:
            phases.precondition(self, ready, lr)
        marks.append(self._clock())
        timings = {part: (b - a) * 1e3 for part, (a, b) in zip(TIMED_PARTS[1:4], pairwise(marks), strict=True)}
        timings["hooks"] = self.recorder.hook_seconds * 1e3
        timings["total"] = sum(timings.values())
        self.timings_ms = timings
        for part, ms in timings.items():
            self.timing_totals_ms[part] += ms
        self.step_bytes = self.exchange.total_bytes() - bytes_before

    def _end_step(self) -> None:
        self.recorder.end_step()
        self.steps += 1
        self.recorder.step = self.steps
        self._due_cache = None

    def _clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def skip_step(self) -> None:
        """Count a step whose optimizer step will not happen (an AMP overflow): finish the factor
        exchange in flight (every rank's collectives stay matched), drop what the hooks
        recorded, touch no factor or decomposition."""
        self.exchange.drop_factor_step()
        self._end_step()

    def note_nonfinite(self, name: str, count: int = 1) -> None:
        self.nonfinite_factor_updates += count
        if count and name not in self._warned_nonfinite:
            self._warned_nonfinite.add(name)
            warn(
                f"K-FAC: non-finite factor statistics in layer {name!r} (NaN/Inf activations or output "
                "gradients); that update was dropped and the running factors kept"
            )

    def remove(self) -> None:
        """Remove every hook; :meth:`step` then leaves gradients as they are."""
        self._removed = True
        self.recorder.remove()

    def __del__(self) -> None:  # the hooks hold only a weak reference back
        with contextlib.suppress(Exception):  # at interpreter exit the parts may be gone already
            self.remove()

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, decompositions, counters and hyperparameters (``engine/state.py``; tensors and
        Python scalars). Collective when distributed: every rank calls it and gets it all."""
        return state.capture(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also of another world size or an older version) at once,
        with no communication. Layers it holds join the plan; layers it lacks start afresh when
        they first record (with one warning)."""
        state.restore(self, saved)
        self._due_cache = None

    def build_plan_from_state(self) -> bool:
        """Kept for callers of earlier versions (:meth:`load_state_dict` now puts a state in force
        at once). Returns whether the plan holds any layer."""
        return bool(self.plan.a_owner)


def _make_config(config: KFACConfig | None, fields: dict[str, Any]) -> KFACConfig:
    if config is not None and fields:
        raise TypeError(f"pass either config or its fields as keywords, not both: {sorted(fields)}")
    if config is not None:
        return config
    try:
        return KFACConfig(**fields)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(
                f"{err}; KFACPreconditioner options are: {', '.join(KFACConfig.__dataclass_fields__)}"
            ) from None
        raise


def _weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` called through a weak reference to its object (None once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        target = ref()
        return None if target is None else target(*args)

    return call
