"""KFACPreconditioner: one K-FAC step, in the order of ``docs/design.md``.

    forward hook   -> a rows of the layer input      -> sum of a a^T
    tensor hook    -> output gradient rows gy         -> sum of B gy gy^T
    step():
      factor update  (every factor_update_freq steps) local factor sums and row counts
                                                      -> reduced to owners, weighted by rows
                                                      -> owners' running averages
      inversion      (every inv_update_freq steps)    owners decompose, damping applied
                                                      -> broadcast to the layer's grad workers
      precondition   (every step)                     grad workers: V' from V = p.grad
                                                      -> broadcast to the other ranks
      KL clip, V' written into p.grad; any torch optimizer then steps.

Usable in a plain loop (``loss.backward(); preconditioner.step(); optimizer.step()``); the
Lightning strategy drives the same object.

Layers join the work plan on the first step their hooks record anything on any rank (a layer
frozen at the start joins when it is unfrozen, a branch when it is first taken); until then
they keep their plain gradient. A factor update averages only the rows that exist: a layer
that sits out a step keeps its running factors, and one that some ranks skip gets the factors
of the ranks that used it.
"""

from __future__ import annotations

import math
import re
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan
from lightning_kfac.distributed.comm import Communicator, FactorBucket, plan_factor_buckets, world_info
from lightning_kfac.engine import curvature
from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.layers import KFACLayer, make_layer
from lightning_kfac.engine.staleness import (
    LayerStaleness,
    StalenessConfig,
    corrected_relative_change,
    relative_change,
)
from lightning_kfac.engine.validation import (
    check_decay,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
)

STATE_VERSION = 1
#: factor updates a trainable layer may record nothing on every rank before it is reported as
#: never firing (a module used functionally); more than one, so a layer that sits out the first
#: step is not mistaken for one
SILENT_AFTER_FACTOR_STEPS = 3
_DECOMPOSITION_KEYS = {"eigen": ("q_a", "d_a", "q_g", "d_g"), "cholesky": ("a_inv", "g_inv")}


@dataclass
class _LayerState:
    layer: KFACLayer
    handles: list[Any] = field(default_factory=list)
    # accumulated over the hook firings of one factor-update step
    a_sum: Tensor | None = None
    a_rows: int = 0
    g_sum: Tensor | None = None
    g_rows: int = 0
    g_calls: int = 0
    g_passes: int = 0  # backward passes that reached the layer
    last_pass: int = -1
    # owner's running averages
    running_a: Tensor | None = None
    running_g: Tensor | None = None
    # grad worker's decomposition (eigen: q, d, inverse denominator; cholesky: inverses)
    q_a: Tensor | None = None
    d_a: Tensor | None = None
    q_g: Tensor | None = None
    d_g: Tensor | None = None
    inv_denominator: Tensor | None = None
    a_inv: Tensor | None = None
    g_inv: Tensor | None = None
    # count of dropped non-finite factor updates, on the device until the next inversion
    nonfinite: Tensor | None = None
    # the same on every rank: factor updates and inversions so far, and whether the bias
    # column was part of the decomposition in force
    a_updates: int = 0
    g_updates: int = 0
    inversions: int = 0
    decomposed_with_bias: bool | None = None
    silent_factor_steps: int = 0

    def clear_batch(self) -> None:
        self.a_sum = None
        self.a_rows = 0
        self.g_sum = None
        self.g_rows = 0
        self.g_calls = 0
        self.g_passes = 0
        self.last_pass = -1

    @property
    def recorded(self) -> bool:
        return bool(self.a_rows or self.g_calls)

    @property
    def has_factors(self) -> bool:
        return self.a_updates > 0 and self.g_updates > 0

    def clear_decomposition(self) -> None:
        self.q_a = self.d_a = self.q_g = self.d_g = self.inv_denominator = self.a_inv = self.g_inv = None
        self.inversions = 0
        self.decomposed_with_bias = None


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    kind: str
    reason: str


class KFACPreconditioner:
    """Kronecker-factored preconditioning of every supported layer of ``model``.

    Args:
        model: the module to precondition (hooks go on its ``nn.Linear``, ``nn.Conv1d/2d/3d``
            and ``nn.Embedding`` layers, frozen or not).
        damping: Tikhonov damping lambda > 0, applied at each inversion.
        factor_update_freq: steps between factor updates.
        inv_update_freq: steps between inversions (decompositions).
        factor_decay: running-average decay in [0, 1).
        kl_clip: KL-clip bound (None disables it); needs the learning rate, see :meth:`step`.
        lr: default learning rate for KL clipping when :meth:`step` is not given one.
        config: structural options (:class:`KFACConfig`); or pass its fields as keywords.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        factor_update_freq: int = 1,
        inv_update_freq: int = 10,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        lr: float | Callable[[], float] | None = None,
        config: KFACConfig | None = None,
        **config_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None and config_kwargs:
            raise TypeError(f"pass either config or its fields as keywords, not both: {sorted(config_kwargs)}")
        try:
            self.config = config if config is not None else KFACConfig(**config_kwargs)
        except TypeError as err:
            if "unexpected keyword" in str(err):
                allowed = ", ".join(KFACConfig.__dataclass_fields__)
                raise TypeError(f"{err}; KFACPreconditioner options are: {allowed}") from None
            raise
        if self.config.split_factors and self.config.inverse_method == "cholesky":
            raise ValueError(
                "split_factors=True is only available with inverse_method='eigen' (the factored "
                "Tikhonov damping of 'cholesky' needs A and G on one rank)"
            )
        self.damping = damping
        self.factor_update_freq = factor_update_freq
        self.inv_update_freq = inv_update_freq
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.lr = lr
        #: correction for losses divided by the number of accumulated micro-batches (Lightning)
        self.accumulation_steps = 1
        #: when False the hooks record nothing (evaluation loops, sanity checks)
        self.recording = True

        self.steps = 0
        self._removed = False
        self.rank, self.world_size = world_info()
        self._grad_workers = self.config.grad_workers_per_layer(self.world_size)
        # factor sums of float16 factors are accumulated in float32: products of loss-scaled
        # gradients overflow float16 long before the scale is divided out
        factor_dtype = self.config.factor_dtype
        self._accumulate_dtype = torch.float32 if factor_dtype == torch.float16 else factor_dtype
        self._layers: dict[str, _LayerState] = {}
        self.skipped: list[SkippedLayer] = []
        self._model = weakref.ref(model)
        self._register(model)

        self._plan = WorkPlan.build(
            [], self.world_size, self._grad_workers, self.config.assignment_cost, self.config.split_factors
        )
        self._comm: Communicator | None = None
        self._step_buckets: list[FactorBucket] | None = None
        self._exchange: int | None = None
        # most output-gradient calls a layer had in one step: its bucket may go once reached
        self._expected_calls: dict[str, int] = {}
        # per layer, (A, G) rows per rank the wire values are divided by (agreed on every rank)
        self._row_scale: dict[str, tuple[float, float]] = {}
        self._inverse_damping: dict[str, float] = {}
        self._reported_silent: set[str] = set()
        self._loaded_layers: set[str] | None = None
        # backward passes seen (the hooks count the passes that reach each layer)
        self._backward_passes = 0
        self._in_backward = False
        self._pass_tracking = True
        # stale statistics (adaptive per-layer intervals); None: the global intervals apply
        self._staleness: StalenessConfig | None = None
        self.staleness_states: dict[str, LayerStaleness] = {}
        self._next_factor_step: dict[str, int] = {}
        self._next_inverse_step: dict[str, int] = {}
        self._inverted_copies: dict[str, tuple[Tensor, Tensor]] = {}
        # adaptive mode, owners: (sum of ||B_t - A_(t-1)||_F^2 and count of finite updates on
        # the device, count of all updates) per (layer, "a"/"g") since the layer's last
        # inversion: the sampling-noise estimate
        self._deviation: dict[tuple[str, str], tuple[Tensor, Tensor, int]] = {}
        self._pending_intervals: tuple[Any, Tensor, list[str], int] | None = None
        self._due_cache: tuple[int, frozenset[str]] | None = None
        #: steps that inverted at least one layer, and layer inversions in total (same on every rank)
        self.inversions = 0
        self.layer_inversions = 0
        #: synchronise the device around each phase so timings_ms are device times (slower)
        self.sync_timings = False
        self.last_kl_scale: Tensor | None = None
        #: decompositions that failed (also after a float64 retry) and kept the last good one
        self.decomposition_failures = 0
        #: factor updates dropped for non-finite statistics (read at inversions, no extra sync)
        self.nonfinite_factor_updates = 0
        self._warned_nonfinite: set[str] = set()
        self.timings_ms: dict[str, float] = {"factors": 0.0, "inverse": 0.0, "precondition": 0.0}
        self.step_bytes = 0
        self._bytes_at_last_step = 0

    # ---------------------------------------------------------------------------------------
    # hyperparameters (may change between steps)
    @property
    def damping(self) -> float:
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        self._damping = check_positive_float("damping", value)

    @property
    def factor_update_freq(self) -> int:
        return self._factor_update_freq

    @factor_update_freq.setter
    def factor_update_freq(self, value: int) -> None:
        self._factor_update_freq = check_positive_int("factor_update_freq", value)

    @property
    def inv_update_freq(self) -> int:
        return self._inv_update_freq

    @inv_update_freq.setter
    def inv_update_freq(self, value: int) -> None:
        self._inv_update_freq = check_positive_int("inv_update_freq", value)

    @property
    def factor_decay(self) -> float:
        return self._factor_decay

    @factor_decay.setter
    def factor_decay(self, value: float) -> None:
        self._factor_decay = check_decay("factor_decay", value)

    @property
    def kl_clip(self) -> float | None:
        return self._kl_clip

    @kl_clip.setter
    def kl_clip(self, value: float | None) -> None:
        self._kl_clip = check_optional_positive_float("kl_clip", value)

    @property
    def staleness(self) -> StalenessConfig | None:
        """Adaptive per-layer update intervals (stale statistics), or None for the global
        ``factor_update_freq`` / ``inv_update_freq``."""
        return self._staleness

    @staleness.setter
    def staleness(self, value: StalenessConfig | None) -> None:
        if value is not None and not isinstance(value, StalenessConfig):
            raise TypeError(f"staleness must be a StalenessConfig or None, got {type(value).__name__}")
        if value is not None and self.config.split_factors:
            raise ValueError(
                "staleness (adaptive intervals) measures each layer's change on the rank holding both "
                "of its factors; it cannot be combined with split_factors=True (set split_factors=False)"
            )
        if value == self._staleness:
            return
        self._sync_intervals()
        self._staleness = value
        self.staleness_states = {}
        self._inverted_copies = {}
        self._deviation = {}
        self._due_cache = None
        if value is not None:
            for name in self._layers:
                self._start_adaptive_layer(name)

    def _start_adaptive_layer(self, name: str) -> None:
        assert self._staleness is not None
        self.staleness_states[name] = LayerStaleness(self._staleness, self._inv_update_freq, self._factor_update_freq)
        self._next_factor_step[name] = self.steps
        self._next_inverse_step[name] = self.steps

    # ---------------------------------------------------------------------------------------
    # registration and hooks
    def _register(self, model: nn.Module) -> None:
        patterns = [re.compile(p) for p in self.config.skip_layers]
        matched = [False] * len(patterns)
        seen: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            layer, reason = make_layer(name, module)
            if layer is None and reason is None:
                continue
            hits = [i for i, p in enumerate(patterns) if p.fullmatch(name) or p.fullmatch(type(module).__name__)]
            for i in hits:
                matched[i] = True
            if hits:
                self.skipped.append(SkippedLayer(name, type(module).__name__, "matched skip_layers"))
                continue
            if layer is None:
                self.skipped.append(SkippedLayer(name, type(module).__name__, reason or ""))
                continue
            state = _LayerState(layer)
            state.handles.append(module.register_forward_hook(self._make_forward_hook(state)))
            self._layers[name] = state
        for pattern, hit in zip(self.config.skip_layers, matched):
            if not hit:
                warnings.warn(f"skip_layers pattern {pattern!r} matched no supported layer", stacklevel=3)
        if not self._layers:
            warnings.warn(
                f"{type(model).__name__} has no layer K-FAC can precondition (nn.Linear, nn.Conv1d/2d/3d, "
                "nn.Embedding); gradients pass through unchanged",
                stacklevel=3,
            )

    def _recording_now(self, module: nn.Module, state: _LayerState) -> bool:
        return (
            self.recording
            and module.training
            and torch.is_grad_enabled()
            and state.layer.trains
            and state.layer.name in self._due_factor_layers()
        )

    def _due_factor_layers(self) -> frozenset[str]:
        """Layers whose factors are updated at this step (the same set on every rank): those
        the schedule picks, and trainable layers that have no factors yet (so a layer records
        from the first step on which it trains)."""
        if self._due_cache is not None and self._due_cache[0] == self.steps:
            return self._due_cache[1]
        self._sync_intervals()
        if self._staleness is None:
            scheduled = self.steps % self._factor_update_freq == 0
            due = {n for n in self._layers if scheduled}
        else:
            due = {n for n in self._layers if self.steps >= self._next_factor_step.get(n, 0)}
        due.update(
            n
            for n, s in self._layers.items()
            if not s.has_factors and s.layer.trains and n not in self._reported_silent
        )
        frozen = frozenset(due)
        self._due_cache = (self.steps, frozen)
        return frozen

    def _due_inverse_layers(self) -> list[str]:
        """Planned, training layers with factors whose decomposition is due: by the schedule,
        because they were never decomposed, or because their bias froze or thawed since."""
        due = []
        scheduled_all = self._staleness is None and self.steps % self._inv_update_freq == 0
        for name in self._planned():
            state = self._layers[name]
            if not state.has_factors or not state.layer.trains:
                continue
            scheduled = scheduled_all or (
                self._staleness is not None and self.steps >= self._next_inverse_step.get(name, 0)
            )
            reshaped = state.inversions > 0 and state.layer.has_bias and state.decomposed_with_bias != state.layer.bias_trains
            if scheduled or state.inversions == 0 or reshaped:
                due.append(name)
        return due

    def _planned(self) -> list[str]:
        """Layers in the work plan, in registration order."""
        return [n for n in self._layers if n in self._plan.a_owner]

    def _make_forward_hook(self, state: _LayerState) -> Callable:
        # the model's hook table must not keep a discarded preconditioner alive
        owner = weakref.ref(self)

        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            pre = owner()
            if pre is None or not inputs or not isinstance(output, Tensor) or not pre._recording_now(module, state):
                return
            x = inputs[0]
            if not isinstance(x, Tensor):
                return
            layer = state.layer
            if pre._plan.a_owner and pre._exchange is None:
                pre._start_exchange()
            with torch.no_grad(), _autocast_off(x), curvature.intra_op_threads(pre.config.cpu_threads):
                a, rows = layer.a_statistics(x.detach(), pre._accumulate_dtype)
                state.a_sum = a if state.a_sum is None else state.a_sum.add_(a)
                state.a_rows += rows
            if output.requires_grad:
                mask = layer.output_row_mask(x)
                output.register_hook(_make_output_grad_hook(owner, state, layer.batch_size(x), mask))

        return forward_hook

    def _record_output_grad(self, state: _LayerState, batch: int, mask: Tensor | None, grad: Tensor) -> None:
        self._enter_backward_pass()
        with torch.no_grad(), _autocast_off(grad), curvature.intra_op_threads(self.config.cpu_threads):
            rows = state.layer.output_grad_rows(grad.detach()).to(self._accumulate_dtype)
            if mask is not None:
                rows = rows[mask]
            g = torch.mm(rows.T, rows).mul_(batch)
            state.g_sum = g if state.g_sum is None else state.g_sum.add_(g)
            state.g_rows += rows.shape[0]
            state.g_calls += 1
            if state.last_pass != self._backward_passes:
                state.last_pass = self._backward_passes
                state.g_passes += 1
        if self._exchange is not None:
            self._launch_ready_buckets()

    def _enter_backward_pass(self) -> None:
        """Counts backward passes: the first output-gradient hook of a pass starts one, and a
        callback autograd runs when that pass finishes closes it (as DDP does)."""
        if self._in_backward or not self._pass_tracking:
            return
        self._in_backward = True
        self._backward_passes += 1
        owner = weakref.ref(self)

        def end_of_pass() -> None:
            pre = owner()
            if pre is not None:
                pre._in_backward = False

        try:
            Variable._execution_engine.queue_callback(end_of_pass)
        except RuntimeError:  # not inside an autograd pass: fall back to the accumulation count
            self._in_backward = False
            self._pass_tracking = False

    def remove(self) -> None:
        """Remove every hook; :meth:`step` then leaves gradients as they are."""
        self._removed = True
        for state in self._layers.values():
            for handle in state.handles:
                handle.remove()
            state.handles.clear()
            state.clear_batch()

    def __del__(self) -> None:  # the hooks hold only a weak reference back
        try:
            self.remove()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------
    # introspection
    @property
    def layers(self) -> dict[str, KFACLayer]:
        """Registered layers, less those reported as never firing."""
        return {name: s.layer for name, s in self._layers.items() if name not in self._reported_silent}

    @property
    def plan(self) -> WorkPlan:
        """Owners and gradient workers of the layers that have recorded (the same on every rank)."""
        return self._plan

    @property
    def has_factors(self) -> bool:
        return any(s.has_factors for s in self._layers.values())

    @property
    def has_inverse(self) -> bool:
        return any(s.inversions > 0 for s in self._layers.values())

    def recorded_anything(self) -> bool:
        """Whether the hooks hold statistics for the next step."""
        return any(s.recorded or s.a_sum is not None or s.g_sum is not None for s in self._layers.values())

    def prospective_plan(self) -> WorkPlan:
        """The work plan as it stands, with every registered layer that trains and is not yet in
        it added as if its hooks fired. Computed locally, no communication; for summaries."""
        waiting = [n for n, s in self._layers.items() if n not in self._plan.a_owner and s.layer.trains]
        shapes = [self._layer_shape(n) for n in waiting if n not in self._reported_silent]
        if not self._plan.a_owner:  # nothing planned yet: as the first step would plan
            workers = self.config.grad_workers_per_layer(self.world_size)
            cost, split = self.config.assignment_cost, self.config.split_factors
            return WorkPlan.build(shapes, self.world_size, workers, cost, split)
        return self._plan.extended(shapes) if shapes else self._plan

    def frozen_layers(self) -> list[SkippedLayer]:
        """Registered layers whose weight does not train now: plain gradient until it does."""
        return [
            SkippedLayer(n, s.layer.kind, "frozen (weight.requires_grad=False); preconditioned once it trains")
            for n, s in self._layers.items()
            if not s.layer.trains
        ]

    def _layer_shape(self, name: str) -> LayerShape:
        layer = self._layers[name].layer
        return LayerShape(name, layer.a_dim, layer.g_dim)

    def first_order_parameters(self) -> list[str]:
        """Names of the trainable parameters K-FAC leaves to their plain gradient (norms,
        skipped or unsupported layers, free-standing parameters such as MultiheadAttention's
        in_proj_weight or positional embeddings)."""
        model = self._model()
        if model is None:
            return []
        covered = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]

    def factors(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """The running (A, G) of every layer, as far as this rank holds them (owners only)."""
        return {name: (s.running_a, s.running_g) for name, s in self._layers.items()}

    def bytes_by_kind(self) -> dict[str, int]:
        return dict(self._comm.bytes_by_kind) if self._comm is not None else {}

    def memory_usage(self) -> dict[str, int]:
        """Bytes this rank holds: running factors, decompositions, and the factor total of a
        fully replicated scheme for comparison."""
        itemsize = self.config.factor_dtype.itemsize
        replicated = sum(
            (s.layer.a_layout.numel + s.layer.g_layout.numel) * itemsize for s in self._layers.values()
        )
        factors = decompositions = 0
        for state in self._layers.values():
            for t in (state.running_a, state.running_g):
                factors += t.numel() * t.element_size() if t is not None else 0
            for t in (state.q_a, state.d_a, state.q_g, state.d_g, state.inv_denominator, state.a_inv, state.g_inv):
                decompositions += t.numel() * t.element_size() if t is not None else 0
        return {"factors": factors, "decompositions": decompositions, "replicated_factors": replicated}

    # ---------------------------------------------------------------------------------------
    # the step
    @torch.no_grad()
    def step(self, lr: float | None = None, grad_scale: float | Tensor | None = None) -> None:
        """Precondition the gradients in place. Call after backward (and after DDP's
        all-reduce), before the optimizer step.

        Args:
            lr: learning rate for KL clipping (defaults to the constructor's ``lr``).
            grad_scale: factor the output gradients were multiplied by (an AMP loss scale);
                the G factors are divided by its square.
        """
        self._in_backward = False
        if not self._layers or self._removed:
            self._end_step()
            return
        with curvature.intra_op_threads(self.config.cpu_threads):
            self._step(lr, grad_scale)

    def _step(self, lr: float | None, grad_scale: float | Tensor | None) -> None:
        self._check_wire_dtype(grad_scale)
        self._start_comm()
        self._sync_intervals()
        start = self._clock()
        due = self._due_factor_layers()
        if due:
            self._update_factors(due, grad_scale)
        factors_done = self._clock()
        inverting = self._due_inverse_layers()
        if inverting:
            self._invert(inverting)
        inverse_done = self._clock()
        if any(self._layers[n].inversions > 0 for n in self._planned()):
            self._precondition(lr)
        end = self._clock()

        self.timings_ms = {
            "factors": (factors_done - start) * 1e3,
            "inverse": (inverse_done - factors_done) * 1e3,
            "precondition": (end - inverse_done) * 1e3,
        }
        if self._comm is not None:
            # since the previous step: buckets launched from this step's backward hooks count too
            total = self._comm.total_bytes()
            self.step_bytes, self._bytes_at_last_step = total - self._bytes_at_last_step, total
        self._end_step()

    def _end_step(self) -> None:
        self.steps += 1
        self._due_cache = None

    def _clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start_comm(self) -> None:
        """Collective, on the first step: K-FAC's process groups."""
        if self._comm is None and self.world_size > 1:
            self._comm = Communicator(self._plan, self.rank, self.config.bucket_cap_bytes)

    def _check_wire_dtype(self, grad_scale: float | Tensor | None) -> None:
        if grad_scale is None or self.world_size == 1 or self._wire_dtype() != torch.float16:
            return
        raise ValueError(
            "factors travel in float16 (comm_dtype, or factor_dtype=float16 with comm_dtype set to it), "
            "which cannot carry the factors of loss-scaled gradients (a scale of 2**16 squared overflows "
            "float16). Use comm_dtype='bfloat16' or leave comm_dtype=None (float32 on the wire)."
        )

    def _wire_dtype(self) -> torch.dtype:
        return self.config.comm_dtype or self._accumulate_dtype

    def skip_step(self) -> None:
        """Count a step whose optimizer step will not happen (an AMP overflow): drop what the
        hooks recorded, finish any factor exchange already in flight so every rank's
        collectives stay matched, and touch no factor or decomposition."""
        self._in_backward = False
        if self._exchange is not None:
            self._launch_ready_buckets(flush=True)
            self._wait_buckets(self._step_buckets or [])
            self._exchange = self._step_buckets = None
        for state in self._layers.values():
            state.clear_batch()
        self._end_step()

    def build_plan_from_state(self) -> bool:
        """Kept for callers of earlier versions: :meth:`load_state_dict` now puts a state in
        force at once. Returns whether the plan holds any layer."""
        return bool(self._plan.a_owner)

    # --- plan ----------------------------------------------------------------------------------
    def _grow_plan(self, names: list[str], totals: dict[str, tuple[float, float]]) -> None:
        """Adds layers that recorded for the first time (on some rank) to the work plan, the
        same way on every rank."""
        self._plan = self._plan.extended([self._layer_shape(n) for n in names])
        if self._comm is not None:
            self._comm.plan = self._plan
        for name in names:
            self._row_scale[name] = self._agreed_row_scale(totals[name])
            if self._staleness is not None and name not in self.staleness_states:
                self._start_adaptive_layer(name)
            if name in self._reported_silent:
                self._reported_silent.discard(name)
                self.skipped = [s for s in self.skipped if s.name != name]
        fresh = [n for n in names if self._loaded_layers is not None and n not in self._loaded_layers]
        if fresh:
            warnings.warn(
                f"K-FAC: {', '.join(fresh)} not in the loaded K-FAC state (new, or frozen when it was saved); "
                "its factors start afresh",
                stacklevel=4,
            )
            self._loaded_layers = (self._loaded_layers or set()) | set(fresh)

    def _agreed_row_scale(self, totals: tuple[float, float]) -> tuple[float, float]:
        """Rows per rank (from totals every rank has), the divisor that keeps wire values at the
        factors' own magnitude."""
        return tuple(max(1.0, t / self.world_size) for t in totals)  # type: ignore[return-value]

    def _note_silent_layers(self, due: frozenset[str], totals: dict[str, tuple[float, float]]) -> None:
        """A trainable layer that recorded nothing on any rank in several factor updates is
        reported once: its module is probably used functionally (hooks never fire)."""
        silent = []
        for name, state in self._layers.items():
            if name in self._plan.a_owner or name in self._reported_silent or name not in due or not state.layer.trains:
                continue
            state.silent_factor_steps += 1
            if state.silent_factor_steps >= SILENT_AFTER_FACTOR_STEPS:
                a_rows = totals.get(name, (0.0, 0.0))[0]
                reason = (
                    "its output never received a gradient (not part of the loss?)"
                    if a_rows
                    else "hooks never fired (used functionally?)"
                )
                self.skipped.append(SkippedLayer(name, state.layer.kind, f"{reason}; plain gradient until they fire"))
                self._reported_silent.add(name)
                silent.append(name)
        if silent:
            warnings.warn(
                f"K-FAC: the hooks of {', '.join(silent)} never fired in the first {SILENT_AFTER_FACTOR_STEPS} "
                "factor updates on any rank (the module is probably used functionally, e.g. "
                "MultiheadAttention.out_proj); they keep their plain gradient unless they fire later",
                stacklevel=4,
            )

    # --- factors -------------------------------------------------------------------------------
    # What travels per layer: the rows-weighted sums of A and of G (each rank's G is first made
    # the mean over the backward passes that reached the layer), divided by the agreed rows per
    # rank so the values keep the factors' magnitude; the row counts travel in one small
    # all-reduce. The owner divides by the total rows: ranks and passes without rows add nothing.
    def _g_pass_scale(self, state: _LayerState) -> float:
        """k^2 / (passes that reached the layer), k the accumulation count: G of the mean over
        the micro-batches the layer took part in (each loss was divided by k)."""
        passes = state.g_passes if self._pass_tracking else self.accumulation_steps
        return self.accumulation_steps**2 / max(1, passes)

    def _wire_tensor(self, name: str, which: str) -> Tensor:
        state = self._layers[name]
        layer = state.layer
        layout = layer.a_layout if which == "a" else layer.g_layout
        scale_a, scale_g = self._row_scale[name]
        if which == "a":
            value = state.a_sum / scale_a if state.a_sum is not None else None
        else:
            weight = self._g_pass_scale(state) * state.g_rows / scale_g
            value = state.g_sum * weight if state.g_sum is not None else None
        if value is None:
            value = torch.zeros(layout.shape, dtype=self._accumulate_dtype, device=layer.weight.device)
        return layout.pack(value, self.config.symmetric_comm)

    def _layer_complete(self, name: str) -> bool:
        """All of this step's calls of the layer have (as far as the past tells) delivered their
        output gradient. A later call makes the bucket late: it is sent again at the step."""
        expected = self._expected_calls.get(name)
        state = self._layers[name]
        return expected is not None and state.a_rows > 0 and state.g_calls >= expected

    def _plan_step_buckets(self) -> None:
        due = self._due_factor_layers()
        names = [n for n in reversed(self._planned()) if n in due]  # backward runs roughly in reverse order
        self._step_buckets = self._buckets_for(names)
        self._exchange = 0  # index of the next bucket to launch

    def _buckets_for(self, names: list[str]) -> list[FactorBucket]:
        sizes = {}
        itemsize = self._wire_dtype().itemsize
        for name in names:
            layer = self._layers[name].layer
            for layout in (layer.a_layout, layer.g_layout):
                sizes[(name, layout.key)] = layout.wire_numel(self.config.symmetric_comm) * itemsize
        return plan_factor_buckets(names, self._plan.a_owner, self._plan.g_owner, sizes, self.config.bucket_cap_bytes)

    def _start_exchange(self) -> None:
        """Called by the first recording forward hook of a step (once layers are planned); from
        then on backward hooks launch buckets as their layers complete."""
        if self.config.overlap_factor_comm and self._comm is not None and self._exchange is None:
            self._plan_step_buckets()

    def _launch_bucket(self, bucket: FactorBucket) -> None:
        assert self._comm is not None
        tensors = [self._wire_tensor(name, which) for name, which in bucket.entries]
        bucket.snapshot = {n: self._counts_of(n) for n in bucket.layers}
        bucket.pending = self._comm.reduce_to(bucket.owner, tensors, self.config.comm_dtype)

    def _counts_of(self, name: str) -> tuple[int, int, int]:
        state = self._layers[name]
        return state.a_rows, state.g_rows, state.g_passes

    def _launch_ready_buckets(self, flush: bool = False) -> None:
        """Launch buckets strictly in their fixed order, as far as their layers are complete
        (``flush``: all remaining). The same order on every rank keeps collectives matched."""
        assert self._step_buckets is not None and self._exchange is not None
        while self._exchange < len(self._step_buckets):
            bucket = self._step_buckets[self._exchange]
            if not flush and not all(self._layer_complete(name) for name in bucket.layers):
                return
            self._launch_bucket(bucket)
            self._exchange += 1

    def _wait_buckets(self, buckets: list[FactorBucket]) -> dict[tuple[str, str], Tensor]:
        """Waits for ``buckets``; the reduced wire values of the factors this rank owns."""
        reduced: dict[tuple[str, str], Tensor] = {}
        for bucket in buckets:
            assert bucket.pending is not None
            values = bucket.pending.wait()
            bucket.pending = None
            if bucket.owner == self.rank:
                reduced.update(zip(bucket.entries, values))
        return reduced

    def _exchange_factors(self, due: frozenset[str]) -> tuple[dict[tuple[str, str], Tensor], dict[str, tuple[float, float]]]:
        """Collective. Every step bucket goes out (in order), then the row counts of every
        registered layer and a late flag per bucket travel in one all-reduce; layers that
        recorded for the first time join the plan and send, and late buckets are sent again
        in full. Returns the summed wire values this rank owns and the total rows per layer."""
        assert self._comm is not None
        if self._exchange is None:
            self._plan_step_buckets()
        self._launch_ready_buckets(flush=True)
        step_buckets = self._step_buckets or []
        names = list(self._layers)
        local = [float(c) for n in names for c in self._counts_of(n)[:2]]
        local += [float(any(self._counts_of(n) != b.snapshot.get(n) for n in b.layers)) for b in step_buckets]
        summed = self._comm.all_reduce_counts(local)
        totals = {n: (summed[2 * i], summed[2 * i + 1]) for i, n in enumerate(names)}
        late = [b for b, flag in zip(step_buckets, summed[2 * len(names) :]) if flag > 0]
        reduced = self._wait_buckets(step_buckets)
        new = [n for n in names if n in due and n not in self._plan.a_owner and min(totals[n]) > 0]
        if new:
            self._grow_plan(new, totals)
        extra = late + self._buckets_for(list(reversed(new)))
        for bucket in extra:
            self._launch_bucket(bucket)
        reduced.update(self._wait_buckets(extra))
        self._exchange = self._step_buckets = None
        return reduced, totals

    def _update_factors(self, due: frozenset[str], grad_scale: float | Tensor | None) -> None:
        for name, state in self._layers.items():
            if state.g_calls:
                self._expected_calls[name] = max(self._expected_calls.get(name, 0), state.g_calls)
        if self.world_size == 1:
            totals = {n: (float(self._layers[n].a_rows), float(self._layers[n].g_rows)) for n in self._layers}
            new = [n for n in self._layers if n in due and n not in self._plan.a_owner and min(totals[n]) > 0]
            if new:
                self._grow_plan(new, totals)
            batches = self._local_batch_factors(due)
        else:
            reduced, totals = self._exchange_factors(due)
            batches = self._owner_batch_factors(reduced, totals)
        for state in self._layers.values():
            state.clear_batch()
        self._note_silent_layers(due, totals)
        correction = _inverse_square(grad_scale)
        for (name, which), (batch, scale) in batches.items():
            if which == "g" and correction is not None:
                scale = scale * correction
            self._update_running(self._layers[name], which, batch, scale)
        for name in self._planned():
            if name not in due:
                continue
            state = self._layers[name]
            rows_a, rows_g = totals[name]
            state.a_updates += int(rows_a > 0)
            state.g_updates += int(rows_g > 0)
            if min(rows_a, rows_g) > 0:
                self._row_scale[name] = self._agreed_row_scale((rows_a, rows_g))
            if self._staleness is not None:
                self._next_factor_step[name] = self.steps + self.staleness_states[name].factor_interval

    def _local_batch_factors(self, due: frozenset[str]) -> dict:
        """One process: (batch factor before its scalar scale, the scale) per factor with rows."""
        batches: dict[tuple[str, str], tuple[Tensor, float]] = {}
        for name in self._planned():
            state = self._layers[name]
            if name not in due:
                continue
            if state.a_sum is not None and state.a_rows:
                batches[(name, "a")] = (state.a_sum, 1.0 / state.a_rows)
            if state.g_sum is not None and state.g_rows:
                batches[(name, "g")] = (state.g_sum, self._g_pass_scale(state))
        return batches

    def _owner_batch_factors(self, reduced: dict[tuple[str, str], Tensor], totals: dict[str, tuple[float, float]]) -> dict:
        """The owner's batch factors from the reduced wire values: divided by the total rows."""
        batches: dict[tuple[str, str], tuple[Tensor, float]] = {}
        for (name, which), value in reduced.items():
            layer = self._layers[name].layer
            rows = totals[name][0 if which == "a" else 1]
            if rows <= 0:
                continue
            layout = layer.a_layout if which == "a" else layer.g_layout
            factor = layout.unpack(value.to(self._accumulate_dtype), self.config.symmetric_comm)
            batches[(name, which)] = (factor, self._row_scale[name][0 if which == "a" else 1] / rows)
        return batches

    def _update_running(self, state: _LayerState, which: str, batch: Tensor, scale: float | Tensor = 1.0) -> None:
        """Running average of one factor, ``scale * batch`` (``batch`` is scratch, scaled in
        place in the accumulation dtype, then cast). A non-finite batch factor (NaN/Inf
        activations or output gradients, an overflowed AMP step or loss scale) is dropped:
        the running value stays."""
        attr = "running_a" if which == "a" else "running_g"
        running = getattr(state, attr)
        if isinstance(scale, Tensor) or scale != 1.0:
            batch.mul_(scale)
        batch = batch.to(self.config.factor_dtype)
        finite = curvature.all_finite(batch)
        if running is None:
            if not bool(finite):  # one host check per factor, on its first update only
                self._report_nonfinite(state.layer.name)
                return
            setattr(state, attr, batch.clone())  # not a view into a bucket's buffer
            return
        if self._tracks_deviation(state.layer.name):
            self._record_deviation(state.layer.name, which, batch, running, finite)
        curvature.running_average_(running, batch, self._factor_decay, finite)
        # counted on the device; read at the next inversion, which synchronises anyway
        skipped = (~finite).to(torch.int64)
        state.nonfinite = skipped if state.nonfinite is None else state.nonfinite.add_(skipped)

    def _tracks_deviation(self, name: str) -> bool:
        """Noise-corrected staleness: the rank that measures the layer's change (it holds both
        running factors) keeps the sampling-noise statistics."""
        plan = self._plan
        return (
            self._staleness is not None
            and self._staleness.noise_corrected
            and name in plan.a_owner
            and plan.a_owner[name] == plan.g_owner[name] == self.rank
        )

    def _record_deviation(self, name: str, which: str, batch: Tensor, running: Tensor, finite: Tensor) -> None:
        """Adds ||B_t - A_(t-1)||_F^2 of a finite update to the layer's noise statistics (sum and
        count on the device; the count of all updates, for decay^T, on the host)."""
        deviation = torch.linalg.vector_norm(batch - running, dtype=torch.float64).square()
        counted = finite.to(torch.float64)
        deviation = torch.where(finite, deviation, torch.zeros_like(deviation))
        previous = self._deviation.get((name, which))
        if previous is None:
            self._deviation[(name, which)] = (deviation, counted, 1)
        else:
            total, finite_updates, updates = previous
            self._deviation[(name, which)] = (total.add_(deviation), finite_updates.add_(counted), updates + 1)

    def _report_nonfinite(self, name: str, count: int = 1) -> None:
        self.nonfinite_factor_updates += count
        if name not in self._warned_nonfinite:
            self._warned_nonfinite.add(name)
            warnings.warn(
                f"K-FAC: non-finite factor statistics in layer {name!r} (NaN/Inf activations or output "
                "gradients); that update was dropped and the running factors kept",
                stacklevel=4,
            )

    def _collect_nonfinite_counts(self) -> None:
        for name, state in self._layers.items():
            if state.nonfinite is not None:
                count = int(state.nonfinite)
                state.nonfinite = None
                if count:
                    self._report_nonfinite(name, count)

    # --- inversion -----------------------------------------------------------------------------
    def _invert(self, names: list[str]) -> None:
        plan = self._plan
        eigen = self.config.inverse_method == "eigen"
        damping = self._damping
        self._collect_nonfinite_counts()
        inverting = set(names)
        if self._staleness is not None:
            self._observe_staleness(names)
        self._decompose(names)
        for name in names:  # every rank: receivers size the broadcast from these
            self._layers[name].decomposed_with_bias = self._layers[name].layer.bias_trains
        if self._comm is not None and plan.grad_workers > 1:
            self._broadcast_decompositions(inverting)

        for name in names:
            state = self._layers[name]
            if eigen and plan.is_grad_worker(name, self.rank):
                state.inv_denominator = curvature.eigen_inverse_denominator(state.d_g, state.d_a, damping)
            self._inverse_damping[name] = damping
            state.inversions += 1
        self.inversions += 1
        self.layer_inversions += len(names)

    def _decompose(self, names: list[str]) -> None:
        """Owners decompose their factors (eigen: each factor; cholesky: both damped inverses)."""
        plan = self._plan
        dtype = self.config.inverse_dtype
        eigen = self.config.inverse_method == "eigen"
        for name in names:
            state = self._layers[name]
            layer = state.layer
            reshaped = state.decomposed_with_bias is not None and state.decomposed_with_bias != layer.bias_trains
            # a decomposition that fails even in float64 with jitter keeps the last good one; a
            # layer that never had one (or whose bias froze or thawed) gets NaNs, which
            # precondition to its plain gradient
            if eigen:
                for which in ("a", "g"):
                    owners = plan.a_owner if which == "a" else plan.g_owner
                    if owners[name] != self.rank:
                        continue
                    factor = getattr(state, f"running_{which}")
                    if which == "a" and factor is not None:
                        factor = layer.active_a(factor)
                    result = _safe_eigh(factor, dtype)
                    if result is None:
                        self.decomposition_failures += factor is not None
                        previous = (getattr(state, f"q_{which}"), getattr(state, f"d_{which}"))
                        layout = layer.active_a_layout if which == "a" else layer.g_layout
                        keep = previous[1] is not None and not reshaped
                        result = previous if keep else _nan_eigh(layout.dim, layout.diagonal, dtype, layer.weight.device)
                    setattr(state, f"q_{which}", result[0])
                    setattr(state, f"d_{which}", result[1])
            elif plan.a_owner[name] == self.rank:
                a = layer.active_a(state.running_a) if state.running_a is not None else None
                inverses = _safe_cholesky_inverses(a, state.running_g, self._damping, dtype)
                if inverses is None:
                    self.decomposition_failures += state.running_a is not None and state.running_g is not None
                    if state.a_inv is not None and not reshaped:
                        continue
                    device = layer.weight.device
                    nan = float("nan")
                    inverses = (
                        torch.full(layer.active_a_layout.shape, nan, dtype=dtype, device=device),
                        torch.full(layer.g_layout.shape, nan, dtype=dtype, device=device),
                    )
                state.a_inv, state.g_inv = inverses

    # --- stale statistics ----------------------------------------------------------------------
    def _observe_staleness(self, names: list[str]) -> None:
        """Owners measure how far their layers' factors moved since the layer's previous
        inversion and pick the next intervals; every rank learns them from one small async
        all-reduce, awaited only at the next step (no blocking round trip per step)."""
        # row 0: the next interval, row 1: the hold count (probe_after); owners write, others 0
        intervals = torch.zeros(2, len(names), dtype=torch.int64)
        for i, name in enumerate(names):
            tracker = self.staleness_states[name]
            if self._plan.a_owner[name] == self.rank:
                state = self._layers[name]
                previous = self._inverted_copies.get(name)
                if previous is not None and state.running_a is not None and state.running_g is not None:
                    shifts = self._damping_shares(previous[0], previous[1])
                    changes = [
                        self._factor_change(name, which, new, old, shift)
                        for which, new, old, shift in (
                            ("a", state.running_a, previous[0], shifts[0]),
                            ("g", state.running_g, previous[1], shifts[1]),
                        )
                    ]
                    tracker.observe(torch.stack(changes).max())
                if state.running_a is not None and state.running_g is not None:
                    self._inverted_copies[name] = (state.running_a.clone(), state.running_g.clone())
                self._deviation.pop((name, "a"), None)
                self._deviation.pop((name, "g"), None)
                intervals[0, i] = tracker.inverse_interval
                intervals[1, i] = tracker.holds
        work = None
        if self._comm is not None:
            work = dist.all_reduce(intervals, op=dist.ReduceOp.MAX, group=self._comm.world_group, async_op=True)
        self._pending_intervals = (work, intervals, list(names), self.steps)

    def _damping_shares(self, a: Tensor, g: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """What the damping in force adds to A and to G (``pi sqrt(l)``, ``sqrt(l) / pi``) when
        the policy measures changes of the damped factors; zeros otherwise. pi comes from the
        diagonals in the inverse dtype, as the Cholesky inversion computes it."""
        assert self._staleness is not None
        if not self._staleness.damped:
            return 0.0, 0.0
        dtype = self.config.inverse_dtype
        diagonals = [(f if f.dim() == 1 else torch.diagonal(f)).to(dtype) for f in (a, g)]
        pi = curvature.tikhonov_pi(*diagonals).double()
        root = math.sqrt(self._damping)
        return pi * root, root / pi

    def _factor_change(self, name: str, which: str, new: Tensor, old: Tensor, shift: Tensor | float = 0.0) -> Tensor:
        """Relative change of one running factor since the layer's last inversion, less what
        sampling noise explains when the policy asks for it (see ``engine/staleness.py``)."""
        assert self._staleness is not None
        recorded = self._deviation.get((name, which))
        if not self._staleness.noise_corrected or recorded is None:
            return relative_change(new, old, shift)
        total, finite_updates, updates = recorded
        mean = torch.where(finite_updates > 0, total / finite_updates.clamp(min=1.0), torch.zeros_like(total))
        return corrected_relative_change(new, old, mean, self._factor_decay, updates, shift)

    def _sync_intervals(self) -> None:
        if self._pending_intervals is None:
            return
        work, intervals, names, step = self._pending_intervals
        self._pending_intervals = None
        if work is not None:
            work.wait()
        for name, interval, holds in zip(names, *intervals.tolist()):
            tracker = self.staleness_states.get(name)
            if tracker is None:
                continue
            tracker.inverse_interval = int(interval)
            tracker.holds = int(holds)
            self._next_inverse_step[name] = step + int(interval)
            self._next_factor_step[name] = step + tracker.factor_interval
        self._due_cache = None

    def decompositions(self) -> dict[str, dict[str, Tensor]]:
        """The eigenvalues (``d_a``, ``d_g``) of each layer this rank preconditions (eigen), or
        the damped inverses (``a_inv``, ``g_inv``) (cholesky), and the damping they used."""
        out: dict[str, dict[str, Any]] = {}
        for name, state in self._layers.items():
            keys = ("d_a", "d_g") if self.config.inverse_method == "eigen" else ("a_inv", "g_inv")
            values = {k: getattr(state, k) for k in keys if getattr(state, k) is not None}
            if values:
                values["damping"] = self._inverse_damping.get(name)
                out[name] = values
        return out

    def _decomposition_entries(self, name: str, src: int) -> list[tuple[str, tuple[int, ...], bool]]:
        """(attribute, wire shape, packed symmetric) of what ``src`` decomposed for ``name``."""
        plan = self._plan
        layer = self._layers[name].layer
        n_a, n_g = layer.active_a_layout.dim, layer.g_dim
        entries: list[tuple[str, tuple[int, ...], bool]] = []
        if self.config.inverse_method == "eigen":
            if plan.a_owner[name] == src:
                if not layer.a_diagonal:
                    entries.append(("q_a", (n_a, n_a), False))
                entries.append(("d_a", (n_a,), False))
            if plan.g_owner[name] == src:
                entries += [("q_g", (n_g, n_g), False), ("d_g", (n_g,), False)]
        elif plan.a_owner[name] == src:
            if layer.a_diagonal:
                entries.append(("a_inv", (n_a,), False))
            else:
                entries.append(("a_inv", (n_a * (n_a + 1) // 2,), True))
            entries.append(("g_inv", (n_g * (n_g + 1) // 2,), True))
        return entries

    def _broadcast_decompositions(self, inverting: set[str]) -> None:
        """Each owner sends its decompositions to the other gradient workers of its block."""
        plan = self._plan
        assert self._comm is not None
        dtype = self.config.inverse_dtype
        device = next(iter(self._layers.values())).layer.weight.device
        pending = []
        for src in plan.worker_blocks()[plan.block_of(self.rank)]:
            keys, tensors = [], []
            for name in self._planned():
                if name not in inverting:
                    continue
                state = self._layers[name]
                for attr, shape, packed in self._decomposition_entries(name, src):
                    keys.append((name, attr, packed))
                    if src == self.rank:
                        value = getattr(state, attr)
                        tensors.append(curvature.pack_symmetric(value) if packed else value)
                    else:
                        tensors.append(torch.empty(shape, dtype=dtype, device=device))
            if tensors:
                pending.append((src, keys, self._comm.broadcast_in_block(src, tensors)))
        for src, keys, work in pending:
            values = work.wait()
            if src == self.rank:
                continue
            for (name, attr, packed), value in zip(keys, values):
                state = self._layers[name]
                if packed:
                    n = state.layer.active_a_layout.dim if attr == "a_inv" else state.layer.g_dim
                    value = curvature.unpack_symmetric(value, n)
                setattr(state, attr, value)

    # --- preconditioning -----------------------------------------------------------------------
    def _ready(self) -> list[str]:
        """Layers preconditioned at this step (the same on every rank): planned, training, and
        decomposed for the parameters that train now."""
        ready = []
        for name in self._planned():
            state = self._layers[name]
            layer = state.layer
            if state.inversions > 0 and layer.trains and (not layer.has_bias or state.decomposed_with_bias == layer.bias_trains):
                ready.append(name)
        return ready

    def _precondition(self, lr: float | None) -> None:
        plan = self._plan
        eigen = self.config.inverse_method == "eigen"
        dtype = self.config.inverse_dtype
        ready = self._ready()
        if not ready:
            return
        grads: dict[str, Tensor | None] = {name: self._layers[name].layer.grad_matrix() for name in ready}
        preconditioned: dict[str, Tensor] = {}
        for name in ready:
            if not plan.is_grad_worker(name, self.rank):
                continue
            state = self._layers[name]
            grad = grads[name]
            if grad is None:
                layer = state.layer
                grad = torch.zeros(layer.g_dim, layer.active_a_layout.dim, device=layer.weight.device)
            v = grad.to(dtype)
            if eigen:
                out = curvature.eigen_precondition(v, state.q_a, state.q_g, state.inv_denominator)
            else:
                out = curvature.cholesky_precondition(v, state.a_inv, state.g_inv)
            # a failed decomposition (non-finite) leaves this layer's plain gradient in place
            # (also when the result overflows the gradient's dtype, e.g. float16 models); the
            # inner product <V', V> is non-finite exactly then, in one pass and no allocation
            if out.dtype != grad.dtype:
                out = out.to(grad.dtype)
            # in place: `out` is a fresh result of the matmuls above, never a view of the gradient
            preconditioned[name] = torch.where(torch.isfinite(_inner(out, grad)), out, grad, out=out)

        if self._comm is not None and plan.grad_workers < self.world_size:
            self._receive_gradients(ready, grads, preconditioned)

        scale: Tensor | None = None
        if self._kl_clip is not None:
            lr_value = self._resolve_lr(lr)
            vg_sum = torch.zeros((), dtype=torch.float64, device=next(iter(preconditioned.values())).device)
            for name in ready:  # one fixed order on every rank: bitwise-equal sums
                grad = grads[name]
                if grad is not None:
                    vg_sum += _inner(preconditioned[name], grad)
            scale = curvature.kl_clip_scale(vg_sum, lr_value, self._kl_clip)
        self.last_kl_scale = scale

        for name, out in preconditioned.items():
            if grads[name] is None:
                continue
            self._layers[name].layer.write_grad(out, None if scale is None else scale.to(out.dtype))

    def _receive_gradients(self, ready: list[str], grads: dict[str, Tensor | None], preconditioned: dict[str, Tensor]) -> None:
        plan = self._plan
        assert self._comm is not None
        position = self.rank % plan.grad_workers
        pending = []
        for src in range(position, self.world_size, plan.grad_workers):
            names = [name for name in ready if plan.gradient_source(name, self.rank) == src]
            if not names:
                continue
            if src == self.rank:
                tensors = [preconditioned[name] for name in names]
            else:
                tensors = []
                for name in names:
                    layer = self._layers[name].layer
                    grad = grads[name]
                    dtype = grad.dtype if grad is not None else layer.weight.dtype
                    shape = (layer.g_dim, layer.active_a_layout.dim)
                    tensors.append(torch.empty(shape, dtype=dtype, device=layer.weight.device))
            pending.append((src, names, self._comm.broadcast_in_receive_group(src, tensors)))
        for src, names, work in pending:
            values = work.wait()
            if src != self.rank:
                preconditioned.update(zip(names, values))

    def _resolve_lr(self, lr: float | None) -> float:
        if lr is None:
            lr = self.lr() if callable(self.lr) else self.lr
        if lr is None:
            raise ValueError(
                "kl_clip is set but no learning rate is known: pass lr to step(), or lr= to "
                "KFACPreconditioner, or set kl_clip=None"
            )
        return float(lr)

    # ---------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        """Factors, decompositions, counters and hyperparameters (tensors and Python scalars).

        Collective when distributed: every rank must call it; each returns the full state.
        """
        planned = self._planned()
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "hyperparameters": {
                "damping": self._damping,
                "factor_update_freq": self._factor_update_freq,
                "inv_update_freq": self._inv_update_freq,
                "factor_decay": self._factor_decay,
                "kl_clip": self._kl_clip,
            },
            "inverse_method": self.config.inverse_method,
            "inverse_damping": {n: d for n, d in self._inverse_damping.items() if n in self._plan.a_owner},
            "inversions": self.inversions,
            "layer_inversions": self.layer_inversions,
            "adaptive": self._adaptive_state(),
            "has_factors": self.has_factors,
            "has_inverse": self.has_inverse,
            "layers": self._gather_layer_state(planned),
            "layer_meta": {
                n: {
                    "a_updates": s.a_updates,
                    "g_updates": s.g_updates,
                    "inversions": s.inversions,
                    "decomposed_with_bias": s.decomposed_with_bias,
                    "row_scale": list(self._row_scale.get(n, (1.0, 1.0))),
                }
                for n, s in ((n, self._layers[n]) for n in planned)
            },
        }

    def _layer_state_keys(self, state: _LayerState) -> list[str]:
        keys = []
        if state.a_updates:
            keys.append("running_a")
        if state.g_updates:
            keys.append("running_g")
        if state.inversions:
            keys += _DECOMPOSITION_KEYS[self.config.inverse_method]
        return [k for k in keys if not (k == "q_a" and state.layer.a_diagonal)]

    def _owner_of(self, name: str, key: str) -> int:
        if key in ("running_a", "q_a", "d_a", "a_inv", "g_inv"):
            return self._plan.a_owner[name]
        return self._plan.g_owner[name]

    def _gather_layer_state(self, planned: list[str]) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {name: {} for name in planned}
        if self._comm is None:
            for name in planned:
                state = self._layers[name]
                for key in self._layer_state_keys(state):
                    value = getattr(state, key)
                    if value is not None:
                        out[name][key] = value.clone()
            return out
        device = next(iter(self._layers.values())).layer.weight.device
        pending = []
        for src in range(self.world_size):
            entries, tensors = [], []
            for name in planned:
                state = self._layers[name]
                for key in self._layer_state_keys(state):
                    if self._owner_of(name, key) != src:
                        continue
                    shape, dtype = self._state_shape(state, key)
                    entries.append((name, key))
                    if src != self.rank:
                        tensors.append(torch.empty(shape, dtype=dtype, device=device))
                    else:  # an owner whose first update was non-finite holds none: NaN, dropped at load
                        value = getattr(state, key)
                        tensors.append(value if value is not None else torch.full(shape, float("nan"), dtype=dtype, device=device))
            if tensors:
                pending.append((entries, self._comm.broadcast_world(src, tensors)))
        for entries, work in pending:
            for (name, key), value in zip(entries, work.wait()):
                out[name][key] = value.clone()
        return out

    def _state_shape(self, state: _LayerState, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        layer = state.layer
        if key.startswith("running"):
            layout = layer.a_layout if key == "running_a" else layer.g_layout
            return layout.shape, self.config.factor_dtype
        is_a = key in ("q_a", "d_a", "a_inv")
        n = layer.g_dim
        if is_a:
            n = layer.a_dim - int(layer.has_bias and state.decomposed_with_bias is False)
        vector = key.startswith("d_") or (is_a and layer.a_diagonal)
        return ((n,) if vector else (n, n)), self.config.inverse_dtype

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, also one saved with another world size, and put it in
        force at once (no communication). Layers the state holds join the work plan; layers it
        lacks start their factors afresh when they first record (with one warning)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a lightning_kfac state (version {STATE_VERSION}): keys {keys}")
        if state["inverse_method"] != self.config.inverse_method and state["has_inverse"]:
            raise ValueError(
                f"the state was saved with inverse_method={state['inverse_method']!r}, this preconditioner "
                f"uses {self.config.inverse_method!r}"
            )
        layers = state["layers"]
        meta = state.get("layer_meta") or {}
        self._check_state_shapes(layers, meta)
        hyper = state["hyperparameters"]
        self.damping = hyper["damping"]
        self.factor_update_freq = hyper["factor_update_freq"]
        self.inv_update_freq = hyper["inv_update_freq"]
        self.factor_decay = hyper["factor_decay"]
        self.kl_clip = hyper["kl_clip"]
        self.steps = int(state["steps"])
        self._due_cache = None
        unknown = sorted(set(layers) - set(self._layers))
        if unknown:
            warnings.warn(f"K-FAC state has layers this model does not precondition: {unknown}", stacklevel=2)
        saved = [n for n in self._layers if n in layers]
        joining = [n for n in saved if n not in self._plan.a_owner]
        if joining:
            self._plan = self._plan.extended([self._layer_shape(n) for n in joining])
            if self._comm is not None:
                self._comm.plan = self._plan
        for name in self._planned():
            if name not in layers:  # planned here, absent there: afresh
                state_ = self._layers[name]
                state_.running_a = state_.running_g = None
                state_.a_updates = state_.g_updates = 0
                state_.clear_decomposition()
        damping = state["inverse_damping"]
        # (a single float: states written before per-layer intervals existed)
        self._inverse_damping = dict(damping) if isinstance(damping, dict) else {n: damping for n in saved}
        self.inversions = int(state.get("inversions", 0))
        self.layer_inversions = int(state.get("layer_inversions", 0))
        self._loaded_layers = set(layers)
        for name in saved:
            self._apply_layer_state(name, layers[name], meta.get(name))
        self._load_adaptive_state(state.get("adaptive"))

    def _check_state_shapes(self, layers: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        """Refuse a state whose factors do not fit this model's layers, naming what differs."""
        for name, saved in layers.items():
            if name not in self._layers:
                continue
            layer = self._layers[name].layer
            for key, value in saved.items():
                if key.startswith("running"):
                    layout = layer.a_layout if key == "running_a" else layer.g_layout
                    allowed = [layout.shape]
                else:
                    probe = _LayerState(layer)
                    allowed = []
                    for with_bias in (True, False) if layer.has_bias else (None,):
                        probe.decomposed_with_bias = with_bias
                        allowed.append(self._state_shape(probe, key)[0])
                if tuple(value.shape) not in allowed:
                    side = "A" if key.endswith("_a") or key == "a_inv" else "G"
                    raise ValueError(
                        f"K-FAC state does not fit this model: layer {name!r} factor {side} ({key}) has shape "
                        f"{tuple(value.shape)} in the state, this model's {layer.kind} needs {allowed[0]}"
                    )

    def _apply_layer_state(self, name: str, saved: dict[str, Tensor], meta: dict[str, Any] | None) -> None:
        state = self._layers[name]
        layer = state.layer
        device = layer.weight.device
        has_decomposition = any(k in saved for k in _DECOMPOSITION_KEYS[self.config.inverse_method])
        if meta is None:  # a state written before per-layer counters existed
            with_bias = layer.has_bias if has_decomposition else None
            meta = {
                "a_updates": int("running_a" in saved),
                "g_updates": int("running_g" in saved),
                "inversions": int(has_decomposition),
                "decomposed_with_bias": with_bias if layer.has_bias else None,
            }
        state.a_updates = int(meta["a_updates"])
        state.g_updates = int(meta["g_updates"])
        state.inversions = int(meta["inversions"])
        state.decomposed_with_bias = meta["decomposed_with_bias"]
        state.running_a = state.running_g = None
        state.q_a = state.d_a = state.q_g = state.d_g = state.inv_denominator = state.a_inv = state.g_inv = None
        self._row_scale[name] = tuple(float(v) for v in meta.get("row_scale", (1.0, 1.0)))  # type: ignore[assignment]
        for key, value in saved.items():
            keep = self._owner_of(name, key) == self.rank if key.startswith("running") else self._plan.is_grad_worker(name, self.rank)
            if not keep:
                continue
            _, dtype = self._state_shape(state, key)
            tensor = value.to(device=device, dtype=dtype).clone()
            if key.startswith("running") and not bool(curvature.all_finite(tensor)):
                continue  # its owner never had a finite update
            setattr(state, key, tensor)
        if state.inversions and self.config.inverse_method == "eigen" and self._plan.is_grad_worker(name, self.rank):
            if state.d_a is not None and state.d_g is not None:
                damping = self._inverse_damping.get(name, self._damping)
                state.inv_denominator = curvature.eigen_inverse_denominator(state.d_g, state.d_a, damping)

    def _adaptive_state(self) -> dict[str, Any] | None:
        self._sync_intervals()
        if self._staleness is None:
            return None
        return {
            name: {
                "tracker": tracker.state_dict(),
                "next_factor_step": self._next_factor_step.get(name, self.steps),
                "next_inverse_step": self._next_inverse_step.get(name, self.steps),
            }
            for name, tracker in self.staleness_states.items()
        }

    def _load_adaptive_state(self, adaptive: dict[str, Any] | None) -> None:
        """Per-layer intervals come back when the preconditioner already has a staleness policy
        (the callback sets it before the state is applied); the factor copies used to measure
        the next change are not saved, so each layer's first inversion after a resume measures
        nothing and keeps its interval."""
        if not adaptive or self._staleness is None:
            return
        for name, saved in adaptive.items():
            tracker = self.staleness_states.get(name)
            if tracker is None:
                continue
            tracker.load_state_dict(saved["tracker"])
            self._next_factor_step[name] = int(saved["next_factor_step"])
            self._next_inverse_step[name] = int(saved["next_inverse_step"])
        self._due_cache = None


# --- numerical fall-backs ---------------------------------------------------------------------
def _safe_eigh(factor: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor] | None:
    """eigh, retried in float64 with jitter; None if both fail or give non-finite values."""
    if factor is None or not bool(curvature.all_finite(factor)):
        return None
    try:
        q, d = curvature.eigen_decompose(factor, dtype)
        if bool(torch.isfinite(d).all()):
            return q, d
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        pass
    try:
        scale = factor.abs().max().double().clamp(min=1e-30)
        jittered = factor.double() / scale
        if factor.dim() == 2:
            jittered = jittered + 1e-10 * torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
        q, d = curvature.eigen_decompose(jittered, torch.float64)
        if bool(torch.isfinite(d).all()):
            return (q.to(dtype) if q is not None else None), (d * scale).to(dtype)
    except RuntimeError:
        pass
    return None


def _nan_eigh(n: int, diagonal: bool, dtype: torch.dtype, device: torch.device) -> tuple[Tensor | None, Tensor]:
    nan = torch.full((n,), float("nan"), dtype=dtype, device=device)
    return (None if diagonal else torch.diag(nan)), nan


def _safe_cholesky_inverses(a: Tensor | None, g: Tensor | None, damping: float, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """Damped inverses, retried in float64; None if both attempts fail or give non-finite values."""
    if a is None or g is None or not bool(curvature.all_finite(a) & curvature.all_finite(g)):
        return None
    for attempt_dtype in (dtype, torch.float64):
        try:
            a_inv, g_inv = curvature.damped_cholesky_inverses(a, g, damping, attempt_dtype)
        except RuntimeError:
            continue
        if bool(curvature.all_finite(a_inv) & curvature.all_finite(g_inv)):
            return a_inv.to(dtype), g_inv.to(dtype)
    return None


def _inverse_square(grad_scale: float | Tensor | None) -> float | Tensor | None:
    """1 / grad_scale^2 in float64 (float32 on devices without it): a loss scale of 2**16 squared
    overflows float16, so the correction is never formed in the factor dtype."""
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, Tensor):
        return 1.0 / (float(grad_scale) ** 2)
    wide = torch.float32 if grad_scale.device.type == "mps" else torch.float64
    return grad_scale.to(wide).square().reciprocal()


def _make_output_grad_hook(
    owner: "weakref.ref[KFACPreconditioner]", state: _LayerState, batch: int, mask: Tensor | None
) -> Callable:
    def output_grad_hook(grad: Tensor) -> None:
        pre = owner()
        if pre is not None:
            pre._record_output_grad(state, batch, mask, grad)

    return output_grad_hook


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> as a float64 scalar; half-precision inputs are summed in float32."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a, b).double()


def _autocast_off(tensor: Tensor):
    device_type = tensor.device.type
    if device_type in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()
