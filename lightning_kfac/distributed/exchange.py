"""Every K-FAC collective of a step, behind one interface (``docs/design.md``, "Exchange").

* factors: each rank's rows-weighted factor sums reduced to the layer's owner, in fused
  buckets launched from the backward hooks as layers complete; the row counts of every layer
  and a late flag per bucket in one small all-reduce; late buckets sent again in full;
* decompositions: from each owner to the other gradient workers of its block;
* gradients: preconditioned gradients from each gradient worker to its receive group;
* state: every owner's factors and decompositions to every rank (checkpoints);
* intervals (adaptive mode) and diagnostics: small all-reduces.

:class:`LocalExchange` is the one-process case (nothing moves); :class:`GroupExchange` runs
the collectives on K-FAC's own process groups (:class:`~lightning_kfac.distributed.comm.Communicator`)
and counts their bytes. The engine calls the same methods either way.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kfac.distributed.assignment import WorkPlan
from lightning_kfac.distributed.comm import Communicator, FactorBucket, plan_factor_buckets
from lightning_kfac.engine.factors import FactorLayout, pack_symmetric, unpack_symmetric

#: (layer, "a" or "g") -> (batch factor before its scale, the scale), for the factors this rank owns
Batches = dict[tuple[str, str], tuple[Tensor, float]]
#: layer -> (A rows, G rows) summed over ranks
Totals = dict[str, tuple[float, float]]


class FactorSource(Protocol):
    """What the exchange reads from the engine's recorder for one step."""

    def factor(self, name: str, side: str) -> tuple[Tensor, float, int]:
        """(sum, scale making it this rank's mean, rows) of one factor (zeros if nothing was
        recorded)."""

    def counts(self, name: str) -> tuple[int, int, int]:
        """(A rows, G rows, backward passes) recorded so far."""

    def complete(self, name: str) -> bool:
        """All of the step's calls of the layer have recorded (as far as past steps tell)."""

    def layout(self, name: str, side: str) -> FactorLayout: ...

    def row_scale(self, name: str, side: str) -> float:
        """Rows per rank agreed by every rank (what wire values are divided by)."""


class Grow(Protocol):
    def __call__(self, names: list[str], totals: Totals) -> WorkPlan:
        """Adds layers recorded for the first time to the plan; returns the new plan."""


class Pending(Protocol):
    def wait(self) -> Any: ...


class _Done:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def wait(self) -> Any:
        return self.value


class Exchange:
    """The collectives of one K-FAC step (see the module docstring). Methods not overridden move
    nothing: correct on one process."""

    world_size = 1
    rank = 0
    #: buckets launched from the backward hooks in the current step
    launched_buckets = 0

    def begin_factor_step(self, names: list[str], plan: WorkPlan, source: FactorSource) -> None:
        pass

    def on_output_grad(self) -> None:
        pass

    def finish_factor_step(
        self, due: list[str], registered: list[str], plan: WorkPlan, source: FactorSource, grow: Grow
    ) -> tuple[Batches, Totals]:
        totals = {n: (float(source.counts(n)[0]), float(source.counts(n)[1])) for n in registered}
        new = [n for n in due if n not in plan.a_owner and min(totals[n]) > 0]
        if new:
            plan = grow(new, totals)
        batches: Batches = {}
        for name in due:
            if name not in plan.a_owner:
                continue
            for side in ("a", "g"):
                total, scale, rows = source.factor(name, side)
                if rows:
                    batches[(name, side)] = (total, scale)
        return batches, totals

    def drop_factor_step(self) -> None:
        pass

    def broadcast_decompositions(self, plan: WorkPlan, blocks: dict[str, Any], names: list[str]) -> None:
        pass

    def share_gradients(
        self,
        plan: WorkPlan,
        ready: list[str],
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        preconditioned: dict[str, Tensor],
    ) -> None:
        pass

    def gather_state(self, plan: WorkPlan, blocks: dict[str, Any], names: list[str]) -> dict[str, dict[str, Tensor]]:
        return {
            name: {
                key: getattr(blocks[name], key).clone()
                for key in blocks[name].state_keys()
                if getattr(blocks[name], key) is not None
            }
            for name in names
        }

    def agree_intervals(self, intervals: Tensor) -> Pending:
        return _Done(intervals)

    def max_all_reduce(self, table: Tensor) -> Tensor:
        return table

    def bytes_by_kind(self) -> dict[str, int]:
        return {}

    def total_bytes(self) -> int:
        return 0


class LocalExchange(Exchange):
    """One process: every factor is local, nothing travels."""


class GroupExchange(Exchange):
    """The collectives on K-FAC's process groups (collective to construct: every rank at once)."""

    def __init__(
        self,
        plan: WorkPlan,
        rank: int,
        cap_bytes: int,
        symmetric: bool,
        comm_dtype: torch.dtype | None,
        sum_dtype: torch.dtype,
    ) -> None:
        self.comm = Communicator(plan, rank, cap_bytes)
        #: what factors travel in: ``comm_dtype``, else the dtype of the recorded sums
        self.wire_dtype = comm_dtype or sum_dtype
        self.world_size = plan.world_size
        self.rank = rank
        self.cap_bytes = cap_bytes
        self.symmetric = symmetric
        self.comm_dtype = comm_dtype
        self._buckets: list[FactorBucket] | None = None
        self._next = 0
        self._source: FactorSource | None = None
        self.launched_buckets = 0

    # --- factors -----------------------------------------------------------------------------
    def buckets_for(
        self, names: list[str], plan: WorkPlan, source: FactorSource, wire_dtype: torch.dtype
    ) -> list[FactorBucket]:
        sizes = {}
        for name in names:
            for side in ("a", "g"):
                sizes[(name, side)] = source.layout(name, side).wire_numel(self.symmetric) * wire_dtype.itemsize
        return plan_factor_buckets(names, plan.a_owner, plan.g_owner, sizes, self.cap_bytes)

    def begin_factor_step(self, names: list[str], plan: WorkPlan, source: FactorSource) -> None:
        """At the first recording forward of a step: the step's buckets; from now on the
        output-gradient hooks launch them as their layers complete."""
        if self._buckets is None:
            self._source = source
            self._buckets = self.buckets_for(names, plan, source, self.wire_dtype)
            self._next = 0
            self.launched_buckets = 0

    def on_output_grad(self) -> None:
        if self._buckets is not None:
            self._launch_ready(flush=False)

    def _wire_value(self, name: str, side: str, source: FactorSource) -> Tensor:
        """This rank's mean factor weighted by its rows, over the agreed rows per rank."""
        total, scale, rows = source.factor(name, side)
        value = total * (scale * rows / source.row_scale(name, side))
        return source.layout(name, side).pack(value, self.symmetric)

    def _launch(self, bucket: FactorBucket, source: FactorSource) -> None:
        tensors = [self._wire_value(name, side, source) for name, side in bucket.entries]
        bucket.snapshot = {n: source.counts(n) for n in bucket.layers}
        bucket.pending = self.comm.reduce_to(bucket.owner, tensors, self.comm_dtype)

    def _launch_ready(self, flush: bool) -> None:
        """Launch buckets strictly in their fixed order, as far as their layers are complete
        (``flush``: all remaining). The same order on every rank keeps collectives matched."""
        assert self._buckets is not None and self._source is not None
        while self._next < len(self._buckets):
            bucket = self._buckets[self._next]
            if not flush and not all(self._source.complete(n) for n in bucket.layers):
                return
            self._launch(bucket, self._source)
            self._next += 1
            self.launched_buckets += 0 if flush else 1

    def _wait(self, buckets: list[FactorBucket]) -> dict[tuple[str, str], Tensor]:
        reduced: dict[tuple[str, str], Tensor] = {}
        for bucket in buckets:
            assert bucket.pending is not None
            values = bucket.pending.wait()
            bucket.pending = None
            if bucket.owner == self.rank:
                reduced.update(zip(bucket.entries, values, strict=True))
        return reduced

    def finish_factor_step(
        self, due: list[str], registered: list[str], plan: WorkPlan, source: FactorSource, grow: Grow
    ) -> tuple[Batches, Totals]:
        """Collective. The rest of the step's buckets go out (in order); then the row counts of
        every registered layer and one late flag per bucket travel in one all-reduce; layers that
        recorded for the first time join the plan and send; late buckets are sent again in
        full. Returns this rank's owned batch factors (divided by the total rows) and the totals."""
        if self._buckets is None:
            self._source = source
            self._buckets = self.buckets_for(
                [n for n in reversed(registered) if n in plan.a_owner and n in due], plan, source, self.wire_dtype
            )
            self._next = 0
        self._launch_ready(flush=True)
        buckets = self._buckets
        local = [float(c) for n in registered for c in source.counts(n)[:2]]
        local += [float(any(source.counts(n) != b.snapshot.get(n) for n in b.layers)) for b in buckets]
        summed = self.comm.all_reduce_counts(local)
        totals = {n: (summed[2 * i], summed[2 * i + 1]) for i, n in enumerate(registered)}
        late = [b for b, flag in zip(buckets, summed[2 * len(registered) :], strict=True) if flag > 0]
        reduced = self._wait(buckets)
        new = [n for n in due if n not in plan.a_owner and min(totals[n]) > 0]
        if new:
            plan = grow(new, totals)
        extra = late + self.buckets_for(list(reversed(new)), plan, source, self.wire_dtype)
        for bucket in extra:
            self._launch(bucket, source)
        reduced.update(self._wait(extra))
        self._buckets, self._source = None, None
        return self._normalise(reduced, totals, source), totals

    def _normalise(self, reduced: dict[tuple[str, str], Tensor], totals: Totals, source: FactorSource) -> Batches:
        batches: Batches = {}
        for (name, side), value in reduced.items():
            rows = totals[name][0 if side == "a" else 1]
            if rows > 0:
                layout = source.layout(name, side)
                factor = layout.unpack(value, self.symmetric)
                batches[(name, side)] = (factor, source.row_scale(name, side) / rows)
        return batches

    def drop_factor_step(self) -> None:
        """A step whose factors are dropped (AMP overflow): finish what is in flight."""
        if self._buckets is not None:
            self._launch_ready(flush=True)
            self._wait(self._buckets)
        self._buckets, self._source = None, None

    # --- decompositions, gradients, state ----------------------------------------------------
    def broadcast_decompositions(self, plan: WorkPlan, blocks: dict[str, Any], names: list[str]) -> None:
        """Each owner sends what it decomposed to the other gradient workers of its block."""
        if plan.grad_workers == 1:
            return
        pending = []
        for src in plan.worker_blocks()[plan.block_of(self.rank)]:
            keys, tensors = [], []
            for name in names:
                block = blocks[name]
                for key, shape, packed in block.decomposition_entries(_sides_of(plan, name, src)):
                    keys.append((name, key, packed))
                    if src == self.rank:
                        value = getattr(block, key)
                        tensors.append(pack_symmetric(value) if packed else value)
                    else:
                        tensors.append(torch.empty(shape, dtype=block.inverse_dtype, device=block.layer.weight.device))
            if tensors:
                pending.append((src, keys, self.comm.broadcast_in_block(src, tensors)))
        for src, keys, work in pending:
            values = work.wait()
            if src == self.rank:
                continue
            for (name, key, packed), value in zip(keys, values, strict=True):
                block = blocks[name]
                if packed:
                    value = unpack_symmetric(value, block.active_layout("a" if key == "a_inv" else "g").dim)
                setattr(block, key, value)

    def share_gradients(
        self,
        plan: WorkPlan,
        ready: list[str],
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        preconditioned: dict[str, Tensor],
    ) -> None:
        """Each gradient worker sends its preconditioned gradients to its receive group."""
        if plan.grad_workers == self.world_size:
            return
        device = next(iter(preconditioned.values())).device if preconditioned else torch.device("cpu")
        position = self.rank % plan.grad_workers
        pending = []
        for src in range(position, self.world_size, plan.grad_workers):
            names = [name for name in ready if plan.gradient_source(name, self.rank) == src]
            if not names:
                continue
            if src == self.rank:
                tensors = [preconditioned[name] for name in names]
            else:
                tensors = [torch.empty(shapes[name][0], dtype=shapes[name][1], device=device) for name in names]
            pending.append((src, names, self.comm.broadcast_in_receive_group(src, tensors)))
        for src, names, work in pending:
            values = work.wait()
            if src != self.rank:
                preconditioned.update(zip(names, values, strict=True))

    def gather_state(self, plan: WorkPlan, blocks: dict[str, Any], names: list[str]) -> dict[str, dict[str, Tensor]]:
        """Every owner's state tensors to every rank (an owner whose first update was
        non-finite sends NaN, which loading drops)."""
        out: dict[str, dict[str, Tensor]] = {name: {} for name in names}
        pending = []
        for src in range(self.world_size):
            entries, tensors = [], []
            for name in names:
                block = blocks[name]
                for key in block.state_keys():
                    if owner_of(plan, name, key) != src:
                        continue
                    shape, dtype = block.state_shape(key)
                    value = getattr(block, key) if src == self.rank else None
                    device = block.layer.weight.device
                    if value is None:
                        value = (
                            torch.full(shape, float("nan"), dtype=dtype, device=device)
                            if src == self.rank
                            else torch.empty(shape, dtype=dtype, device=device)
                        )
                    entries.append((name, key))
                    tensors.append(value)
            if tensors:
                pending.append((entries, self.comm.broadcast_world(src, tensors)))
        for entries, work in pending:
            for (name, key), value in zip(entries, work.wait(), strict=True):
                out[name][key] = value.clone()
        return out

    def agree_intervals(self, intervals: Tensor) -> Pending:
        """Element-wise max over ranks, asynchronously (awaited at the next step)."""
        self.comm.bytes_by_kind["intervals"] += intervals.numel() * intervals.element_size()
        work = dist.all_reduce(intervals, op=dist.ReduceOp.MAX, group=self.comm.world_group, async_op=True)
        return _Awaited(work, intervals)

    def max_all_reduce(self, table: Tensor) -> Tensor:
        self.comm.bytes_by_kind["diagnostics"] += table.numel() * table.element_size()
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=self.comm.world_group)
        return table

    def bytes_by_kind(self) -> dict[str, int]:
        return dict(self.comm.bytes_by_kind)

    def total_bytes(self) -> int:
        return self.comm.total_bytes()


def ensure_group_exchange(
    exchange: Exchange, plan: WorkPlan, rank: int, config: Any, sum_dtype: torch.dtype, grad_scale: Any
) -> Exchange:
    """The exchange for a step: on the first step of a distributed run, K-FAC's process groups
    (collective: every rank at once). Refuses a float16 wire under a loss scale."""
    wire = config.comm_dtype or sum_dtype
    if grad_scale is not None and plan.world_size > 1 and wire == torch.float16:
        raise ValueError(
            "factors travel in float16 (comm_dtype), which cannot carry the factors of loss-scaled "
            "gradients (a scale of 2**16 squared overflows float16). Use comm_dtype='bfloat16' or leave "
            "comm_dtype=None (the factors' own dtype, float32 for float16 factors)."
        )
    if plan.world_size == 1 or isinstance(exchange, GroupExchange):
        return exchange
    return GroupExchange(plan, rank, config.bucket_cap_bytes, config.symmetric_comm, config.comm_dtype, sum_dtype)


class _Awaited:
    def __init__(self, work: Any, value: Tensor) -> None:
        self.work, self.value = work, value

    def wait(self) -> Tensor:
        self.work.wait()
        return self.value


def _sides_of(plan: WorkPlan, name: str, rank: int) -> tuple[str, ...]:
    return tuple(side for side, owners in (("a", plan.a_owner), ("g", plan.g_owner)) if owners[name] == rank)


def owner_of(plan: WorkPlan, name: str, key: str) -> int:
    """The rank holding state tensor ``key`` of layer ``name`` (a decomposition of both factors
    together, the Cholesky inverses, lives with A's owner, which then owns G too)."""
    return plan.a_owner[name] if key.endswith("_a") or key == "a_inv" or key == "g_inv" else plan.g_owner[name]


def sides_of(plan: WorkPlan, name: str, rank: int) -> tuple[str, ...]:
    """The factors of ``name`` that ``rank`` owns (and decomposes)."""
    return _sides_of(plan, name, rank)
