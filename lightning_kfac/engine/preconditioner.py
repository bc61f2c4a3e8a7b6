"""KFACPreconditioner: one K-FAC step, in the order of ``shared/ARCHITECTURE.md``.

    forward hook   -> a rows of the layer input      -> sum of a a^T
    tensor hook    -> output gradient rows gy         -> sum of B gy gy^T
    step():
      factor update  (every factor_update_freq steps) local factors -> reduced to owners
                                                      -> owners' running averages
      inversion      (every inv_update_freq steps)    owners decompose, damping applied
                                                      -> broadcast to the layer's grad workers
      precondition   (every step)                     grad workers: V' from V = p.grad
                                                      -> broadcast to the other ranks
      KL clip, V' written into p.grad; any torch optimizer then steps.

Usable in a plain loop (``loss.backward(); preconditioner.step(); optimizer.step()``); the
Lightning strategy drives the same object.
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

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan
from lightning_kfac.distributed.comm import (
    Communicator,
    FactorBucket,
    all_ranks_agree_min,
    plan_factor_buckets,
    world_info,
)
from lightning_kfac.engine import curvature
from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.staleness import LayerStaleness, StalenessConfig
from lightning_kfac.engine.staleness import corrected_relative_change, relative_change
from lightning_kfac.engine.layers import KFACLayer, make_layer
from lightning_kfac.engine.validation import (
    check_decay,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
)

STATE_VERSION = 1


@dataclass
class _LayerState:
    layer: KFACLayer
    handles: list[Any] = field(default_factory=list)
    # accumulated over the hook firings of one factor-update step
    a_sum: Tensor | None = None
    a_rows: int = 0
    g_sum: Tensor | None = None
    g_calls: int = 0
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

    def clear_batch(self) -> None:
        self.a_sum = None
        self.a_rows = 0
        self.g_sum = None
        self.g_calls = 0


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    kind: str
    reason: str


class KFACPreconditioner:
    """Kronecker-factored preconditioning of every supported layer of ``model``.

    Args:
        model: the module to precondition (hooks go on its ``nn.Linear`` and ``nn.Conv2d``).
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
        self._layers: dict[str, _LayerState] = {}
        self.skipped: list[SkippedLayer] = []
        self._model = weakref.ref(model)
        self._register(model)

        self._plan: WorkPlan | None = None
        self._comm: Communicator | None = None
        self._step_buckets: list[FactorBucket] | None = None
        self._exchange: int | None = None
        self._expected_calls: dict[str, int] | None = None
        self._has_factors = False
        self._has_inverse = False
        self._inverse_damping: dict[str, float] = {}
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
        self._pending_state: dict[str, Any] | None = None
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
                self.staleness_states[name] = LayerStaleness(value, self._inv_update_freq, self._factor_update_freq)
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
                f"{type(model).__name__} has no layer K-FAC can precondition (nn.Linear, nn.Conv2d); "
                "gradients pass through unchanged",
                stacklevel=3,
            )

    def _recording_now(self, module: nn.Module, name: str) -> bool:
        return self.recording and module.training and torch.is_grad_enabled() and name in self._due_factor_layers()

    def _due_factor_layers(self) -> frozenset[str]:
        """Layers whose factors are updated at this step (the same set on every rank)."""
        if self._due_cache is not None and self._due_cache[0] == self.steps:
            return self._due_cache[1]
        self._sync_intervals()
        if self._staleness is None:
            due = frozenset(self._layers) if self.steps % self._factor_update_freq == 0 else frozenset()
        else:
            due = frozenset(n for n in self._layers if self.steps >= self._next_factor_step.get(n, 0))
        self._due_cache = (self.steps, due)
        return due

    def _due_inverse_layers(self) -> list[str]:
        if not self._has_factors:
            return []
        if self._staleness is None:
            return list(self._layers) if self.steps % self._inv_update_freq == 0 else []
        return [n for n in self._layers if self.steps >= self._next_inverse_step.get(n, 0)]

    def _make_forward_hook(self, state: _LayerState) -> Callable:
        # the model's hook table must not keep a discarded preconditioner alive
        owner = weakref.ref(self)

        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            pre = owner()
            if pre is None or not inputs or not isinstance(output, Tensor) or not pre._recording_now(module, state.layer.name):
                return
            x = inputs[0]
            if not isinstance(x, Tensor):
                return
            layer = state.layer
            if pre._plan is not None and pre._exchange is None:
                pre._start_exchange()
            with torch.no_grad(), _autocast_off(x):
                a, rows = layer.a_statistics(x.detach(), pre.config.factor_dtype)
                state.a_sum = a if state.a_sum is None else state.a_sum.add_(a)
                state.a_rows += rows
            if output.requires_grad:
                mask = layer.output_row_mask(x)
                output.register_hook(_make_output_grad_hook(owner, state, layer.batch_size(x), mask))

        return forward_hook

    def _record_output_grad(self, state: _LayerState, batch: int, mask: Tensor | None, grad: Tensor) -> None:
        with torch.no_grad(), _autocast_off(grad):
            rows = state.layer.output_grad_rows(grad.detach()).to(self.config.factor_dtype)
            if mask is not None:
                rows = rows[mask]
            g = torch.mm(rows.T, rows).mul_(batch)
            state.g_sum = g if state.g_sum is None else state.g_sum.add_(g)
            state.g_calls += 1
        if self._exchange is not None:
            self._launch_ready_buckets()

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
        return {name: state.layer for name, state in self._layers.items()}

    @property
    def plan(self) -> WorkPlan | None:
        return self._plan

    def prospective_plan(self) -> WorkPlan:
        """The work plan as it stands (before the first step: as if every registered layer's
        hooks fire). Computed locally, no communication; for summaries."""
        if self._plan is not None:
            return self._plan
        shapes = [LayerShape(name, s.layer.a_dim, s.layer.g_dim) for name, s in self._layers.items()]
        return WorkPlan.build(
            shapes,
            self.world_size,
            self._grad_workers,
            self.config.assignment_cost,
            self.config.split_factors,
        )

    def first_order_parameters(self) -> list[str]:
        """Names of the trainable parameters K-FAC leaves to their plain gradient (norms,
        skipped or unsupported layers, free-standing parameters such as MultiheadAttention's
        in_proj_weight or positional embeddings)."""
        model = self._model()
        if model is None:
            return []
        covered = {id(p) for s in self._layers.values() for p in s.layer.parameters()}
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
            (math.prod(s.layer.a_shape) + s.layer.g_dim**2) * itemsize for s in self._layers.values()
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
        if not self._layers or self._removed:
            self.steps += 1
            return
        if self._plan is None and not self._build_plan():
            self.steps += 1
            return
        assert self._plan is not None

        self._sync_intervals()
        start = self._clock()
        if any(s.a_rows or s.g_calls for s in self._layers.values()):
            self._update_factors(grad_scale)
        factors_done = self._clock()
        due = self._due_inverse_layers()
        if due:
            self._invert(due)
        inverse_done = self._clock()
        if self._has_inverse:
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
        self.steps += 1

    def _clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def skip_step(self) -> None:
        """Count a step whose optimizer step will not happen (an AMP overflow): drop what the
        hooks recorded, finish any factor exchange already in flight so every rank's
        collectives stay matched, and touch no factor or decomposition."""
        if self._exchange is not None:
            self._reduce_to_owners()
        for state in self._layers.values():
            state.clear_batch()
        self.steps += 1

    def build_plan_from_state(self) -> bool:
        """Collective. After :meth:`load_state_dict` before the first step: take the layers the
        state holds factors for as the ones whose hooks fire, build the work plan and put the
        state in force now, so that a resumed run preconditions from its first step even when
        that step records no factors. Returns whether a plan was built."""
        pending = self._pending_state
        if self._plan is not None or pending is None or not pending.get("layers"):
            return False
        saved = set(pending["layers"])
        for name, state in self._layers.items():
            if name in saved:  # "fired": the saved run had factors for it
                state.a_rows, state.g_calls = 1, 1
        try:
            built = self._build_plan()
        finally:
            for state in self._layers.values():
                state.clear_batch()
        # calls per micro-batch are learnt at the next factor update; until then every bucket
        # goes at the step, as on a first step
        self._expected_calls = {}
        return built

    # --- plan ----------------------------------------------------------------------------------
    def _build_plan(self) -> bool:
        """On the first step that recorded anything: drop layers whose hooks never fired (on
        any rank), then assign owners. Returns False when nothing was recorded yet."""
        states = list(self._layers.values())
        if not any(s.a_rows or s.g_calls for s in states):
            return False
        device = states[0].layer.weight.device
        fired = torch.tensor([int(s.a_rows > 0 and s.g_calls > 0) for s in states], device=device)
        fired = all_ranks_agree_min(fired).tolist()
        silent = [s.layer.name for s, ok in zip(states, fired) if not ok]
        for name in silent:
            state = self._layers.pop(name)
            for handle in state.handles:
                handle.remove()
            self.skipped.append(
                SkippedLayer(name, state.layer.kind, "hooks never fired (used functionally?); plain gradient")
            )
        if silent:
            warnings.warn(
                f"K-FAC: the hooks of {', '.join(silent)} never fired in the first step (the module is "
                "probably used functionally, e.g. MultiheadAttention.out_proj); these layers keep "
                "their plain gradient",
                stacklevel=3,
            )
        self._plan = self.prospective_plan()
        if self.world_size > 1:
            self._comm = Communicator(self._plan, self.rank, self.config.bucket_cap_bytes)
            self._wire_sizes = self._wire_nbytes()
        for name in silent:
            self.staleness_states.pop(name, None)
        self._due_cache = None  # computed by the hooks before the silent layers were dropped
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._apply_state(pending)
        return True

    # --- factors -------------------------------------------------------------------------------
    # What travels per layer: the local mean A (its row count differs between layers and may
    # differ between ranks) and the raw sum G; G's scale corrections (accumulation, AMP) and the
    # mean over ranks are scalars applied by the owner after the reduction.
    def _local_a(self, state: _LayerState) -> Tensor:
        layer = state.layer
        if state.a_sum is None or state.a_rows == 0:
            return torch.zeros(layer.a_shape, dtype=self.config.factor_dtype, device=layer.weight.device)
        return state.a_sum / state.a_rows

    def _local_g(self, state: _LayerState) -> Tensor:
        layer = state.layer
        if state.g_sum is None:
            return torch.zeros(layer.g_dim, layer.g_dim, dtype=self.config.factor_dtype, device=layer.weight.device)
        return state.g_sum

    def _wire_nbytes(self) -> dict[tuple[str, str], int]:
        itemsize = (self.config.comm_dtype or self.config.factor_dtype).itemsize
        sizes = {}
        for name, state in self._layers.items():
            for which, n in (("a", state.layer.a_dim), ("g", state.layer.g_dim)):
                if which == "a" and state.layer.a_diagonal:
                    values = n
                else:
                    values = n * (n + 1) // 2 if self.config.symmetric_comm else n * n
                sizes[(name, which)] = values * itemsize
        return sizes

    def _g_correction(self, grad_scale: float | Tensor | None, device: torch.device) -> Tensor | float:
        correction: Tensor | float = self.accumulation_steps / self.world_size
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=self.config.factor_dtype, device=device)
            correction = correction / (scale * scale)
        return correction

    def _wire_tensor(self, name: str, which: str) -> Tensor:
        state = self._layers[name]
        factor = self._local_a(state) if which == "a" else self._local_g(state)
        return curvature.pack_symmetric(factor) if self.config.symmetric_comm and factor.dim() == 2 else factor

    def _layer_complete(self, name: str) -> bool:
        """All of this step's calls of the layer have delivered their output gradient."""
        expected = self._expected_calls.get(name) if self._expected_calls else None
        state = self._layers[name]
        return expected is not None and state.a_rows > 0 and state.g_calls >= expected * self.accumulation_steps

    def _plan_step_buckets(self) -> None:
        assert self._plan is not None
        due = self._due_factor_layers()
        self._step_buckets = plan_factor_buckets(
            [n for n in reversed(self._layers) if n in due],  # backward runs roughly in reverse order
            self._plan.a_owner,
            self._plan.g_owner,
            self._wire_sizes,
            self.config.bucket_cap_bytes,
        )
        self._exchange = 0  # index of the next bucket to launch

    def _start_exchange(self) -> None:
        """Called by the first recording forward hook of a step (after the plan exists); from
        then on backward hooks launch buckets as their layers complete."""
        if self.config.overlap_factor_comm and self._comm is not None and self._exchange is None:
            self._plan_step_buckets()

    def _launch_bucket(self, bucket: FactorBucket) -> None:
        assert self._comm is not None
        tensors = [self._wire_tensor(name, which) for name, which in bucket.entries]
        bucket.pending = self._comm.reduce_to(bucket.owner, tensors, self.config.comm_dtype)

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

    def _reduce_to_owners(self) -> dict[tuple[str, str], Tensor]:
        """Sum of the ranks' local factors, for the factors this rank owns."""
        if self._exchange is None:
            self._plan_step_buckets()
        self._launch_ready_buckets(flush=True)
        assert self._step_buckets is not None
        reduced: dict[tuple[str, str], Tensor] = {}
        for bucket in self._step_buckets:
            assert bucket.pending is not None
            values = bucket.pending.wait()
            bucket.pending = None
            if bucket.owner != self.rank:
                continue
            for (name, which), value in zip(bucket.entries, values):
                layer = self._layers[name].layer
                n = layer.a_dim if which == "a" else layer.g_dim
                value = value.to(self.config.factor_dtype)
                packed = self.config.symmetric_comm and not (which == "a" and layer.a_diagonal)
                reduced[(name, which)] = curvature.unpack_symmetric(value, n) if packed else value
        self._exchange = None
        self._step_buckets = None
        return reduced

    def _update_factors(self, grad_scale: float | Tensor | None) -> None:
        plan = self._plan
        assert plan is not None
        if self._expected_calls is None or not self._expected_calls:
            # calls per micro-batch, learnt on the first factor step: tells the backward hooks
            # when a layer's factors are complete and its bucket may be launched
            self._expected_calls = {
                name: s.g_calls // self.accumulation_steps
                for name, s in self._layers.items()
                if s.g_calls and s.g_calls % self.accumulation_steps == 0
            }
        due = self._due_factor_layers()
        # (layer, "a"/"g") -> (batch factor before its scalar scale, the scale); the tensors are
        # scratch of this step (the hooks' sums or the reduced buckets), free to overwrite
        scaled: dict[tuple[str, str], tuple[Tensor, float | Tensor]] = {}
        if self.world_size == 1:
            for name in due:
                state = self._layers[name]
                if state.a_sum is None or state.a_rows == 0:
                    scaled[(name, "a")] = (self._local_a(state), 1.0)
                else:
                    scaled[(name, "a")] = (state.a_sum, 1.0 / state.a_rows)
                scaled[(name, "g")] = (self._local_g(state), 1.0)
        else:
            for key, total in self._reduce_to_owners().items():
                scaled[key] = (total, 1.0 / self.world_size if key[1] == "a" else 1.0)
        for state in self._layers.values():
            state.clear_batch()
        if self._staleness is not None:
            for name in due:
                self._next_factor_step[name] = self.steps + self.staleness_states[name].factor_interval

        for (name, which), (total, scale) in scaled.items():
            if which == "g":
                scale = self._g_correction(grad_scale, total.device)
            self._update_running(self._layers[name], which, total, scale)
        self._has_factors = True

    def _update_running(self, state: _LayerState, which: str, batch: Tensor, scale: float | Tensor = 1.0) -> None:
        """Running average of one factor, ``scale * batch`` (``batch`` is scratch, updated in
        place). A non-finite batch factor (NaN/Inf activations or output gradients, an
        overflowed AMP step or loss scale) is dropped: the running value stays."""
        attr = "running_a" if which == "a" else "running_g"
        running = getattr(state, attr)
        if isinstance(scale, Tensor) or scale != 1.0:
            batch.mul_(scale)
        finite = curvature.all_finite(batch)
        if running is None:
            if not bool(finite):  # one host check per factor, on its first update only
                self._report_nonfinite(state.layer.name)
                return
            setattr(state, attr, batch.clone())
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
            and plan is not None
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
        assert plan is not None
        dtype = self.config.inverse_dtype
        eigen = self.config.inverse_method == "eigen"
        damping = self._damping
        self._collect_nonfinite_counts()
        inverting = set(names)
        if self._staleness is not None:
            self._observe_staleness(names)
        for name, state in self._layers.items():
            if name not in inverting:
                continue
            # a decomposition that fails even in float64 with jitter keeps the last good one; a
            # layer that never had one gets NaNs, which precondition to its plain gradient
            layer = state.layer
            if eigen:
                for which in ("a", "g"):
                    owners = plan.a_owner if which == "a" else plan.g_owner
                    if owners[name] != self.rank:
                        continue
                    factor = getattr(state, f"running_{which}")
                    result = _safe_eigh(factor, dtype)
                    if result is None:
                        self.decomposition_failures += factor is not None
                        previous = (getattr(state, f"q_{which}"), getattr(state, f"d_{which}"))
                        diagonal = which == "a" and layer.a_diagonal
                        n = layer.a_dim if which == "a" else layer.g_dim
                        result = previous if previous[1] is not None else _nan_eigh(n, diagonal, dtype, layer.weight.device)
                    setattr(state, f"q_{which}", result[0])
                    setattr(state, f"d_{which}", result[1])
            elif plan.a_owner[name] == self.rank:
                inverses = _safe_cholesky_inverses(state.running_a, state.running_g, damping, dtype)
                if inverses is None:
                    self.decomposition_failures += state.running_a is not None and state.running_g is not None
                    if state.a_inv is not None:
                        continue
                    device = layer.weight.device
                    nan = float("nan")
                    inverses = (
                        torch.full(layer.a_shape, nan, dtype=dtype, device=device),
                        torch.full((layer.g_dim, layer.g_dim), nan, dtype=dtype, device=device),
                    )
                state.a_inv, state.g_inv = inverses

        if self._comm is not None and plan.grad_workers > 1:
            self._broadcast_decompositions(inverting)

        for name in names:
            state = self._layers[name]
            if eigen and plan.is_grad_worker(name, self.rank):
                state.inv_denominator = curvature.eigen_inverse_denominator(state.d_g, state.d_a, damping)
            self._inverse_damping[name] = damping
        self._has_inverse = True
        self.inversions += 1
        self.layer_inversions += len(names)

    # --- stale statistics ----------------------------------------------------------------------
    def _observe_staleness(self, names: list[str]) -> None:
        """Owners measure how far their layers' factors moved since the layer's previous
        inversion and pick the next intervals; every rank learns them from one small async
        all-reduce, awaited only at the next step (no blocking round trip per step)."""
        assert self._plan is not None
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
        assert plan is not None
        layer = self._layers[name].layer
        n_a, n_g = layer.a_dim, layer.g_dim
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
        assert plan is not None and self._comm is not None
        dtype = self.config.inverse_dtype
        device = next(iter(self._layers.values())).layer.weight.device
        pending = []
        for src in plan.worker_blocks()[plan.block_of(self.rank)]:
            keys, tensors = [], []
            for name, state in self._layers.items():
                if name not in inverting:
                    continue
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
                    n = state.layer.a_dim if attr == "a_inv" else state.layer.g_dim
                    value = curvature.unpack_symmetric(value, n)
                setattr(state, attr, value)

    # --- preconditioning -----------------------------------------------------------------------
    def _precondition(self, lr: float | None) -> None:
        plan = self._plan
        assert plan is not None
        eigen = self.config.inverse_method == "eigen"
        dtype = self.config.inverse_dtype
        grads: dict[str, Tensor | None] = {name: s.layer.grad_matrix() for name, s in self._layers.items()}
        preconditioned: dict[str, Tensor] = {}
        for name, state in self._layers.items():
            if not plan.is_grad_worker(name, self.rank):
                continue
            grad = grads[name]
            if grad is None:
                grad = torch.zeros(state.layer.g_dim, state.layer.a_dim, device=state.layer.weight.device)
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
            self._receive_gradients(grads, preconditioned)

        scale: Tensor | None = None
        if self._kl_clip is not None:
            lr_value = self._resolve_lr(lr)
            vg_sum = torch.zeros((), dtype=torch.float64, device=next(iter(preconditioned.values())).device)
            for name in self._layers:  # one fixed order on every rank: bitwise-equal sums
                grad = grads[name]
                if grad is not None:
                    vg_sum += _inner(preconditioned[name], grad)
            scale = curvature.kl_clip_scale(vg_sum, lr_value, self._kl_clip)
        self.last_kl_scale = scale

        for name, out in preconditioned.items():
            if grads[name] is None:
                continue
            self._layers[name].layer.write_grad(out, None if scale is None else scale.to(out.dtype))

    def _receive_gradients(self, grads: dict[str, Tensor | None], preconditioned: dict[str, Tensor]) -> None:
        plan = self._plan
        assert plan is not None and self._comm is not None
        position = self.rank % plan.grad_workers
        pending = []
        for src in range(position, self.world_size, plan.grad_workers):
            names = [name for name in self._layers if plan.gradient_source(name, self.rank) == src]
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
                    tensors.append(torch.empty(layer.g_dim, layer.a_dim, dtype=dtype, device=layer.weight.device))
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
        state: dict[str, Any] = {
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
            "inverse_damping": dict(self._inverse_damping),
            "inversions": self.inversions,
            "layer_inversions": self.layer_inversions,
            "adaptive": self._adaptive_state(),
            "has_factors": self._has_factors,
            "has_inverse": self._has_inverse,
            "layers": {},
        }
        if self._plan is None:
            if self._pending_state is not None:
                return self._pending_state
            return state
        gathered = self._gather_layer_state()
        state["layers"] = gathered
        return state

    def _layer_state_keys(self, state: _LayerState) -> list[str]:
        keys = []
        if self._has_factors:
            keys += ["running_a", "running_g"]
        if self._has_inverse:
            keys += ["q_a", "d_a", "q_g", "d_g"] if self.config.inverse_method == "eigen" else ["a_inv", "g_inv"]
        return [k for k in keys if not (k == "q_a" and state.layer.a_diagonal)]

    def _owner_of(self, name: str, key: str) -> int:
        assert self._plan is not None
        if key in ("running_a", "q_a", "d_a", "a_inv", "g_inv"):
            return self._plan.a_owner[name]
        return self._plan.g_owner[name]

    def _gather_layer_state(self) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {name: {} for name in self._layers}
        if self._comm is None:
            for name, state in self._layers.items():
                for key in self._layer_state_keys(state):
                    out[name][key] = getattr(state, key).clone()
            return out
        device = next(iter(self._layers.values())).layer.weight.device
        pending = []
        for src in range(self.world_size):
            entries, tensors = [], []
            for name, state in self._layers.items():
                for key in self._layer_state_keys(state):
                    if self._owner_of(name, key) != src:
                        continue
                    shape, dtype = self._state_shape(state, key)
                    entries.append((name, key))
                    tensors.append(getattr(state, key) if src == self.rank else torch.empty(shape, dtype=dtype, device=device))
            if tensors:
                pending.append((entries, self._comm.broadcast_world(src, tensors)))
        for entries, work in pending:
            for (name, key), value in zip(entries, work.wait()):
                out[name][key] = value.clone()
        return out

    def _state_shape(self, state: _LayerState, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        layer = state.layer
        is_a = key in ("running_a", "q_a", "d_a", "a_inv")
        n = layer.a_dim if is_a else layer.g_dim
        vector = key.startswith("d_") or (is_a and layer.a_diagonal)
        shape = (n,) if vector else (n, n)
        return shape, self.config.factor_dtype if key.startswith("running") else self.config.inverse_dtype

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, also one saved with another world size. Before the first
        step the state is kept and applied once the work plan exists."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a lightning_kfac state (version {STATE_VERSION}): keys {sorted(state)[:8]}")
        if state["inverse_method"] != self.config.inverse_method and state["has_inverse"]:
            raise ValueError(
                f"the state was saved with inverse_method={state['inverse_method']!r}, this preconditioner "
                f"uses {self.config.inverse_method!r}"
            )
        hyper = state["hyperparameters"]
        self.damping = hyper["damping"]
        self.factor_update_freq = hyper["factor_update_freq"]
        self.inv_update_freq = hyper["inv_update_freq"]
        self.factor_decay = hyper["factor_decay"]
        self.kl_clip = hyper["kl_clip"]
        self.steps = int(state["steps"])
        if self._plan is None:
            self._pending_state = state
            return
        self._apply_state(state)

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

    def _apply_state(self, state: dict[str, Any]) -> None:
        plan = self._plan
        assert plan is not None
        layers = state["layers"]
        unknown = sorted(set(layers) - set(self._layers))
        if unknown:
            warnings.warn(f"K-FAC state has layers this model does not precondition: {unknown}", stacklevel=3)
        missing = sorted(set(self._layers) - set(layers))
        if missing and layers:
            warnings.warn(f"K-FAC state lacks layers {missing}; they start from fresh factors", stacklevel=3)
        self._has_factors = bool(state["has_factors"]) and not missing
        self._has_inverse = bool(state["has_inverse"]) and not missing
        damping = state["inverse_damping"]
        # (a single float: states written before per-layer intervals existed)
        self._inverse_damping = dict(damping) if isinstance(damping, dict) else {n: damping for n in self._layers}
        self.inversions = int(state.get("inversions", 0))
        self.layer_inversions = int(state.get("layer_inversions", 0))
        self._load_adaptive_state(state.get("adaptive"))
        for name, saved in layers.items():
            if name not in self._layers:
                continue
            layer_state = self._layers[name]
            device = layer_state.layer.weight.device
            for key, value in saved.items():
                if key.startswith("running"):
                    keep = self._owner_of(name, key) == self.rank
                else:
                    keep = plan.is_grad_worker(name, self.rank)
                if keep:
                    _, dtype = self._state_shape(layer_state, key)
                    setattr(layer_state, key, value.to(device=device, dtype=dtype).clone())
            if self._has_inverse and self.config.inverse_method == "eigen" and plan.is_grad_worker(name, self.rank):
                layer_state.inv_denominator = curvature.eigen_inverse_denominator(
                    layer_state.d_g, layer_state.d_a, self._inverse_damping[name]
                )


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
        jittered = jittered + 1e-10 * torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device) if factor.dim() == 2 else jittered
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

