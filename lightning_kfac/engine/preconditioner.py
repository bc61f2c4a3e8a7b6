"""KFACPreconditioner: wires the parts and runs one K-FAC step in the order of ``docs/design.md``.

    hooks (Recorder)   forward: sum a a^T of the layer input; backward: sum B gy gy^T
    step():
      factors          due layers' sums reduced to their owners, weighted by rows (Exchange)
                       -> owners' running averages (CurvatureBlock.update)
      inversion        owners decompose (CurvatureBlock.decompose) -> gradient workers
      precondition     gradient workers: V' from V = p.grad -> the other ranks; KL clip
                       -> written into p.grad; any torch optimizer then steps

Usable in a plain loop (``loss.backward(); preconditioner.step(); optimizer.step()``); the
Lightning strategy drives the same object. Layers join the work plan on the first step their
hooks record on any rank; until then they keep their plain gradient.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan
from lightning_kfac.distributed.comm import world_info
from lightning_kfac.distributed.exchange import Exchange, GroupExchange, LocalExchange, Totals, owner_of, sides_of
from lightning_kfac.engine import curvature, hyperparameters, state as schema
from lightning_kfac.engine.blocks.base import CurvatureBlock, inner
from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.layers import KFACLayer, SkippedLayer, register_layers
from lightning_kfac.engine.recorder import Recorder
from lightning_kfac.engine.scheduling import AdaptiveSchedule, FixedSchedule
from lightning_kfac.engine.staleness import LayerStaleness, StalenessConfig

#: factor updates a trainable layer may record nothing on every rank before it is reported as
#: never firing (a module used functionally); more than one, so a layer that sits out the first
#: step is not mistaken for one
SILENT_AFTER_FACTOR_STEPS = 3


def _hyperparameter(name: str) -> property:
    def get(self: KFACPreconditioner) -> Any:
        return getattr(self.hyperparameters, name)

    def put(self: KFACPreconditioner, value: Any) -> None:
        setattr(self.hyperparameters, name, value)

    return property(get, put, doc=hyperparameters.RULES[name].doc)


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
        self.config = _make_config(config, config_kwargs)
        self.hyperparameters = hyperparameters.Hyperparameters(
            damping=damping, factor_update_freq=factor_update_freq, inv_update_freq=inv_update_freq,
            factor_decay=factor_decay, kl_clip=kl_clip,
        )  # fmt: skip
        self.lr = lr
        self.steps = 0
        self.rank, self.world_size = world_info()
        self._model = weakref.ref(model)
        layers, self.skipped = register_layers(model, self.config.skip_layers)
        block = self.config.block_class
        self.blocks: dict[str, CurvatureBlock] = {
            n: block(layer, self.config.factor_dtype, self.config.inverse_dtype) for n, layer in layers.items()
        }
        # float16 factors are summed in float32: products of loss-scaled gradients overflow it
        sum_dtype = torch.float32 if self.config.factor_dtype == torch.float16 else self.config.factor_dtype
        # the recorder calls back weakly: the model's hooks must not keep this object alive
        callbacks = [_weak(m) for m in (self._is_due, self._first_record, self._output_grad)]
        self.recorder = Recorder(layers, sum_dtype, self.config.cpu_threads, *callbacks)
        workers = self.config.grad_workers_per_layer(self.world_size)
        self._plan = WorkPlan.build([], self.world_size, workers, self.config.assignment_cost, self.config.split_factors)
        self.exchange: Exchange = LocalExchange()
        self.schedule: FixedSchedule = FixedSchedule(self.hyperparameters)
        self._silent: dict[str, int] = {}  # factor updates each layer stayed silent on every rank
        self._reported_silent: set[str] = set()
        self._loaded_layers: set[str] | None = None
        self._due_cache: tuple[int, frozenset[str]] | None = None
        self._removed = False
        #: steps that inverted at least one layer, layer inversions in total, and the step of the
        #: last inversion (the same on every rank)
        self.inversions = 0
        self.layer_inversions = 0
        self.last_inversion_step: int | None = None
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

    # --- settings ----------------------------------------------------------------------------
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
        if value is not None and not isinstance(value, StalenessConfig):
            raise TypeError(f"staleness must be a StalenessConfig or None, got {type(value).__name__}")
        if value is not None and self.config.split_factors:
            raise ValueError(
                "staleness (adaptive intervals) measures each layer's change on the rank holding both "
                "of its factors; it cannot be combined with split_factors=True (set split_factors=False)"
            )
        if value == self.schedule.config:
            return
        self.schedule.sync()
        if value is None:
            self.schedule = FixedSchedule(self.hyperparameters)
        else:
            self.schedule = AdaptiveSchedule(self.hyperparameters, value, self.config.inverse_dtype)
            for name in self.blocks:
                self.schedule.join(name, self.steps)
        self._due_cache = None

    @property
    def staleness_states(self) -> dict[str, LayerStaleness]:
        return self.schedule.trackers

    # --- introspection -------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, KFACLayer]:
        """Registered layers, less those reported as never firing."""
        return {n: b.layer for n, b in self.blocks.items() if n not in self._reported_silent}

    @property
    def plan(self) -> WorkPlan:
        """Owners and gradient workers of the layers that have recorded (the same on every rank)."""
        return self._plan

    @property
    def has_factors(self) -> bool:
        return any(b.has_factors for b in self.blocks.values())

    @property
    def has_inverse(self) -> bool:
        return any(b.inversions > 0 for b in self.blocks.values())

    def recorded_anything(self) -> bool:
        """Whether the hooks hold statistics for the next step."""
        return self.recorder.anything_recorded()

    def prospective_plan(self) -> WorkPlan:
        """The plan with every trainable registered layer added as if it recorded (local; for
        summaries)."""
        waiting = [n for n, b in self.blocks.items() if n not in self._plan.a_owner and b.layer.trains]
        shapes = [_shape(self.blocks[n].layer) for n in waiting if n not in self._reported_silent]
        if not self._plan.a_owner:  # as the first step would plan, for the world size now
            workers = self.config.grad_workers_per_layer(self.world_size)
            return WorkPlan.build(shapes, self.world_size, workers, self.config.assignment_cost, self.config.split_factors)
        return self._plan.extended(shapes) if shapes else self._plan

    def frozen_layers(self) -> list[SkippedLayer]:
        """Registered layers whose weight does not train now: plain gradient until it does."""
        reason = "frozen (weight.requires_grad=False); preconditioned once it trains"
        return [SkippedLayer(n, b.layer.kind, reason) for n, b in self.blocks.items() if not b.layer.trains]

    def first_order_parameters(self) -> list[str]:
        """Trainable parameters K-FAC leaves to their plain gradient (norms, skipped layers,
        free-standing parameters such as MultiheadAttention's in_proj_weight)."""
        model = self._model()
        if model is None:
            return []
        covered = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]

    def factors(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """The running (A, G) of every layer, as far as this rank holds them (owners only)."""
        return {n: (b.running_a, b.running_g) for n, b in self.blocks.items()}

    def decompositions(self) -> dict[str, dict[str, Any]]:
        """Eigenvalues (``d_a``, ``d_g``; eigen) or damped inverses (``a_inv``, ``g_inv``;
        cholesky) of each layer this rank preconditions, with the damping they used."""
        out: dict[str, dict[str, Any]] = {}
        for name, block in self.blocks.items():
            values = {k: getattr(block, k) for k in ("d_a", "d_g", "a_inv", "g_inv") if getattr(block, k, None) is not None}
            if values:
                out[name] = {**values, "damping": block.damping}
        return out

    def bytes_by_kind(self) -> dict[str, int]:
        return self.exchange.bytes_by_kind()

    def memory_usage(self) -> dict[str, int]:
        """Bytes this rank holds (running factors, decompositions) and the factor total of a
        fully replicated scheme."""
        itemsize = self.config.factor_dtype.itemsize
        usage = {"factors": 0, "decompositions": 0, "replicated_factors": 0}
        for block in self.blocks.values():
            usage["replicated_factors"] += (block.layout("a").numel + block.layout("g").numel) * itemsize
            for key, tensor in block.held_tensors().items():
                usage["factors" if key.startswith("running") else "decompositions"] += tensor.numel() * tensor.element_size()
        return usage

    # --- what is due ---------------------------------------------------------------------------
    def due_factor_layers(self) -> frozenset[str]:
        """Layers whose factors are updated at this step (the same set on every rank): those
        the schedule picks, and trainable layers without factors (they record from the first
        step on which they train)."""
        if self._due_cache is not None and self._due_cache[0] == self.steps:
            return self._due_cache[1]
        self.schedule.sync()
        due = {n for n in self.blocks if self.schedule.factors_due(n, self.steps)}
        due.update(n for n, b in self.blocks.items() if not b.has_factors and b.layer.trains and n not in self._reported_silent)
        self._due_cache = (self.steps, frozenset(due))
        return self._due_cache[1]

    def _is_due(self, name: str) -> bool:
        return name in self.due_factor_layers()

    def _due_inverse_layers(self) -> list[str]:
        """Planned, training layers with factors: due by the schedule, never decomposed, or
        with a bias that froze or thawed since."""
        due = []
        for name in self._planned():
            block = self.blocks[name]
            if block.has_factors and block.layer.trains:
                if self.schedule.inversion_due(name, self.steps) or block.inversions == 0 or block.reshaped:
                    due.append(name)
        return due

    def _planned(self) -> list[str]:
        return [n for n in self.blocks if n in self._plan.a_owner]

    def _first_record(self) -> None:
        if self.config.overlap_factor_comm and self._plan.a_owner:
            due = self.due_factor_layers()
            names = [n for n in reversed(self._planned()) if n in due]  # backward runs roughly in reverse
            self.exchange.begin_factor_step(names, self._plan, self.recorder)

    def _output_grad(self) -> None:
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
        self._check_wire(grad_scale)
        if self.world_size > 1 and not isinstance(self.exchange, GroupExchange):  # collective: every rank at step 0
            config, sum_dtype = self.config, self.recorder.accumulate_dtype
            self.exchange = GroupExchange(self._plan, self.rank, config.bucket_cap_bytes, config.symmetric_comm, config.comm_dtype, sum_dtype)
        bytes_before = self.exchange.total_bytes() - self.step_bytes
        marks = [self._clock()]
        due = self.due_factor_layers()
        if due:
            self._update_factors(due, grad_scale)
        marks.append(self._clock())
        inverting = self._due_inverse_layers()
        if inverting:
            self._invert(inverting)
        marks.append(self._clock())
        ready = [n for n in self._planned() if self.blocks[n].ready]
        if ready:
            self._precondition(ready, lr)
        marks.append(self._clock())
        self.timings_ms = {part: (b - a) * 1e3 for part, a, b in zip(("factors", "inverse", "precondition"), marks, marks[1:])}
        # since the previous step: buckets launched from this step's backward hooks count too
        self.step_bytes = self.exchange.total_bytes() - bytes_before

    def _end_step(self) -> None:
        self.recorder.end_step()
        self.steps += 1
        self._due_cache = None

    def _clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _check_wire(self, grad_scale: float | Tensor | None) -> None:
        wire = self.config.comm_dtype or self.recorder.accumulate_dtype
        if grad_scale is not None and self.world_size > 1 and wire == torch.float16:
            raise ValueError(
                "factors travel in float16 (comm_dtype), which cannot carry the factors of loss-scaled "
                "gradients (a scale of 2**16 squared overflows float16). Use comm_dtype='bfloat16' or leave "
                "comm_dtype=None (the factors' own dtype, float32 for float16 factors)."
            )

    def skip_step(self) -> None:
        """Count a step whose optimizer step will not happen (an AMP overflow): finish the factor
        exchange already in flight (every rank's collectives stay matched), drop what the hooks
        recorded, touch no factor or decomposition."""
        self.exchange.drop_factor_step()
        self._end_step()

    def _update_factors(self, due: frozenset[str], grad_scale: float | Tensor | None) -> None:
        self.recorder.learn_expected_calls()
        registered = list(self.blocks)
        batches, totals = self.exchange.finish_factor_step(
            [n for n in registered if n in due], registered, self._plan, self.recorder, self._grow
        )
        correction = _inverse_square(grad_scale)
        decay = self.hyperparameters.factor_decay
        for (name, side), (batch, scale) in batches.items():
            if side == "g" and correction is not None:
                scale = scale * correction
            observe = self.schedule.observer(name, side) if self._measures_change(name) else None
            if not self.blocks[name].update(side, batch, scale, decay, observe):
                self._report_nonfinite(name)
        updated = [n for n in self._planned() if n in due]
        for name in updated:
            block, (rows_a, rows_g) = self.blocks[name], totals[name]
            block.a_updates += int(rows_a > 0)
            block.g_updates += int(rows_g > 0)
            if min(rows_a, rows_g) > 0:
                self.recorder.row_scales[name] = self._row_scale((rows_a, rows_g))
        self.schedule.after_factor_update(updated, self.steps)
        self._note_silent(due, totals)

    def _row_scale(self, totals: tuple[float, float]) -> tuple[float, float]:
        return max(1.0, totals[0] / self.world_size), max(1.0, totals[1] / self.world_size)

    def _measures_change(self, name: str) -> bool:
        """This rank holds both factors of the layer: it measures its staleness."""
        plan = self._plan
        return self.schedule.config is not None and plan.a_owner.get(name) == plan.g_owner.get(name) == self.rank

    def _grow(self, names: list[str], totals: Totals) -> WorkPlan:
        """Layers that recorded for the first time (on some rank) join the plan, the same way on
        every rank."""
        self._plan = self._plan.extended([_shape(self.blocks[n].layer) for n in names])
        for name in names:
            self.recorder.row_scales[name] = self._row_scale(totals[name])
            self.schedule.join(name, self.steps)
            if name in self._reported_silent:
                self._reported_silent.discard(name)
                self.skipped = [s for s in self.skipped if s.name != name]
        fresh = [n for n in names if self._loaded_layers is not None and n not in self._loaded_layers]
        if fresh:
            message = f"K-FAC: {', '.join(fresh)} not in the loaded K-FAC state (new, or frozen when it was saved); its factors start afresh"
            warnings.warn(message, stacklevel=5)
            self._loaded_layers = (self._loaded_layers or set()) | set(fresh)
        return self._plan

    def _note_silent(self, due: frozenset[str], totals: Totals) -> None:
        """A trainable layer that recorded nothing on any rank in several factor updates is
        reported once: its module is probably used functionally (hooks never fire)."""
        silent = []
        for name, block in self.blocks.items():
            if name in self._plan.a_owner or name in self._reported_silent or name not in due or not block.layer.trains:
                continue
            self._silent[name] = self._silent.get(name, 0) + 1
            if self._silent[name] >= SILENT_AFTER_FACTOR_STEPS:
                fired = "its output never received a gradient (not part of the loss?)" if totals[name][0] else "hooks never fired (used functionally?)"
                self.skipped.append(SkippedLayer(name, block.layer.kind, f"{fired}; plain gradient until they fire"))
                self._reported_silent.add(name)
                silent.append(name)
        if silent:
            warnings.warn(
                f"K-FAC: the hooks of {', '.join(silent)} never fired in the first {SILENT_AFTER_FACTOR_STEPS} factor "
                "updates on any rank (the module is probably used functionally, e.g. MultiheadAttention.out_proj); "
                "they keep their plain gradient unless they fire later",
                stacklevel=5,
            )

    def _report_nonfinite(self, name: str, count: int = 1) -> None:
        self.nonfinite_factor_updates += count
        if count and name not in self._warned_nonfinite:
            self._warned_nonfinite.add(name)
            warnings.warn(
                f"K-FAC: non-finite factor statistics in layer {name!r} (NaN/Inf activations or output "
                "gradients); that update was dropped and the running factors kept",
                stacklevel=5,
            )

    def _invert(self, names: list[str]) -> None:
        for name, block in self.blocks.items():  # read once per inversion, which synchronises anyway
            self._report_nonfinite(name, block.take_nonfinite_count())
        plan, damping = self._plan, self.hyperparameters.damping
        self.schedule.before_inversion(names, self.steps, self.blocks, self._measures_change, self.exchange.agree_intervals)
        for name in names:
            self.decomposition_failures += self.blocks[name].decompose(sides_of(plan, name, self.rank), damping)
        self.exchange.broadcast_decompositions(plan, self.blocks, names)
        for name in names:
            self.blocks[name].finish(damping, plan.is_grad_worker(name, self.rank))
        self.inversions += 1
        self.layer_inversions += len(names)
        self.last_inversion_step = self.steps

    def _precondition(self, ready: list[str], lr: float | None) -> None:
        grads = {name: self.blocks[name].layer.grad_matrix() for name in ready}
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        preconditioned: dict[str, Tensor] = {}
        for name in ready:
            layer, grad = self.blocks[name].layer, grads[name]
            shapes[name] = (layer.g_dim, layer.active_a_layout.dim), grad.dtype if grad is not None else layer.weight.dtype
            if self._plan.is_grad_worker(name, self.rank):
                v = grad if grad is not None else torch.zeros(shapes[name][0], dtype=shapes[name][1], device=layer.weight.device)
                preconditioned[name] = self.blocks[name].precondition(v)
        self.exchange.share_gradients(self._plan, ready, shapes, preconditioned)
        scale = self._kl_scale(ready, grads, preconditioned, lr)
        for name, out in preconditioned.items():
            if grads[name] is not None:
                self.blocks[name].layer.write_grad(out, None if scale is None else scale.to(out.dtype))

    def _kl_scale(self, ready: list[str], grads: dict[str, Tensor | None], preconditioned: dict[str, Tensor], lr: float | None) -> Tensor | None:
        """nu = min(1, sqrt(kl_clip / (lr^2 sum <V', V>))), summed in one fixed order on every rank."""
        kl_clip = self.hyperparameters.kl_clip
        self.last_kl_scale = None
        if kl_clip is None:
            return None
        lr_value = self.lr() if lr is None and callable(self.lr) else (self.lr if lr is None else lr)
        if lr_value is None:
            raise ValueError("kl_clip is set but no learning rate is known: pass lr to step(), or lr= to KFACPreconditioner, or set kl_clip=None")
        vg_sum = torch.zeros((), dtype=torch.float64, device=next(iter(preconditioned.values())).device)
        for name in ready:
            grad = grads[name]
            if grad is not None:
                vg_sum += inner(preconditioned[name], grad)
        self.last_kl_scale = curvature.kl_clip_scale(vg_sum, float(lr_value), kl_clip)
        return self.last_kl_scale

    def remove(self) -> None:
        """Remove every hook; :meth:`step` then leaves gradients as they are."""
        self._removed = True
        self.recorder.remove()

    def __del__(self) -> None:  # the hooks hold only a weak reference back
        try:
            self.remove()
        except Exception:
            pass

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, decompositions, counters and hyperparameters (tensors and Python scalars;
        ``engine/state.py``). Collective when distributed: every rank calls it and gets it all."""
        planned = self._planned()
        return {
            "version": schema.STATE_VERSION,
            "steps": self.steps,
            "hyperparameters": self.hyperparameters.as_dict(),
            "inverse_method": self.config.inverse_method,
            "inversions": self.inversions,
            "layer_inversions": self.layer_inversions,
            "last_inversion_step": self.last_inversion_step,
            "adaptive": self.schedule.state_dict(),
            "has_factors": self.has_factors,
            "has_inverse": self.has_inverse,
            "inverse_damping": {n: self.blocks[n].damping for n in planned if self.blocks[n].damping is not None},
            "layers": self.exchange.gather_state(self._plan, self.blocks, planned),
            "layer_meta": {n: {**self.blocks[n].meta(), "row_scale": list(self.recorder.row_scales.get(n, (1.0, 1.0)))} for n in planned},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one saved with another world size or an older
        version) and put it in force at once, with no communication. Layers it holds join the
        plan; layers it lacks start afresh when they first record (with one warning)."""
        state = schema.migrate(state, self.blocks)
        schema.check_method(state, self.config.inverse_method)
        schema.check_shapes(state["layers"], self.blocks)
        self.hyperparameters.load(state["hyperparameters"])
        self.steps, self._due_cache = int(state["steps"]), None
        layers, meta, damping = state["layers"], state["layer_meta"], state["inverse_damping"]
        unknown = sorted(set(layers) - set(self.blocks))
        if unknown:
            warnings.warn(f"K-FAC state has layers this model does not precondition: {unknown}", stacklevel=2)
        saved = [n for n in self.blocks if n in layers]
        self._plan = self._plan.extended([_shape(self.blocks[n].layer) for n in saved if n not in self._plan.a_owner])
        for name in self._planned():
            if name not in layers:  # planned here, absent there: afresh
                self.blocks[name].reset_factors()
        self.inversions, self.layer_inversions = int(state.get("inversions", 0)), int(state.get("layer_inversions", 0))
        self.last_inversion_step = state.get("last_inversion_step")
        self._loaded_layers = set(layers)
        for name in saved:
            block, layer_meta = self.blocks[name], meta[name]
            worker = self._plan.is_grad_worker(name, self.rank)
            keep = (lambda key, name=name, worker=worker: owner_of(self._plan, name, key) == self.rank if key.startswith("running") else worker)
            block.load(layers[name], {**layer_meta, "damping": damping.get(name)}, keep)
            block.restore(worker)
            self.recorder.row_scales[name] = tuple(float(v) for v in layer_meta.get("row_scale", (1.0, 1.0)))  # type: ignore[assignment]
        for name in self.blocks:
            self.schedule.join(name, self.steps)
        self.schedule.load_state_dict(state.get("adaptive"))

    def build_plan_from_state(self) -> bool:
        """For callers of earlier versions: :meth:`load_state_dict` puts a state in force at once.
        Returns whether the plan holds any layer."""
        return bool(self._plan.a_owner)


def _make_config(config: KFACConfig | None, fields: dict[str, Any]) -> KFACConfig:
    if config is not None and fields:
        raise TypeError(f"pass either config or its fields as keywords, not both: {sorted(fields)}")
    if config is not None:
        return config
    try:
        return KFACConfig(**fields)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"{err}; KFACPreconditioner options are: {', '.join(KFACConfig.__dataclass_fields__)}") from None
        raise


def _weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` called through a weak reference to its object (None once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        target = ref()
        return None if target is None else target(*args)

    return call


def _shape(layer: KFACLayer) -> LayerShape:
    return LayerShape(layer.name, layer.a_dim, layer.g_dim)


def _inverse_square(grad_scale: float | Tensor | None) -> float | Tensor | None:
    """1 / grad_scale^2 in float64 (float32 on MPS): a loss scale of 2**16 squared overflows
    float16, so the correction is never formed in the factor dtype."""
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, Tensor):
        return 1.0 / (float(grad_scale) ** 2)
    wide = torch.float32 if grad_scale.device.type == "mps" else torch.float64
    return grad_scale.to(wide).square().reciprocal()
