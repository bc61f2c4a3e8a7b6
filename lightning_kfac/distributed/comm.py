"""Fused, asynchronous collectives with byte accounting (torch.distributed only).

Tensors bound for the same destination are flattened into buckets of at most ``cap_bytes``,
optionally cast to a narrower wire dtype, and launched with ``async_op=True``; the caller
decides where to wait, so communication overlaps whatever runs in between.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kfac.distributed.assignment import WorkPlan


class PendingCollective:
    """Buckets in flight; :meth:`wait` returns the tensors in their original shapes and dtypes."""

    def __init__(
        self,
        tensors: Sequence[Tensor],
        wire_dtype: torch.dtype | None,
        cap_bytes: int,
        launch: Callable[[Tensor], Any],
        on_bytes: Callable[[int], None],
    ) -> None:
        self._shapes = [t.shape for t in tensors]
        self._dtypes = [t.dtype for t in tensors]
        self._buckets: list[tuple[Tensor, list[int], Any]] = []  # (flat, indices, the collective's work)
        bucket: list[int] = []
        size = 0
        for index, tensor in enumerate(tensors):
            dtype = wire_dtype or tensor.dtype
            nbytes = tensor.numel() * dtype.itemsize
            if bucket and size + nbytes > cap_bytes:
                self._launch(tensors, bucket, wire_dtype, launch, on_bytes)
                bucket, size = [], 0
            bucket.append(index)
            size += nbytes
        if bucket:
            self._launch(tensors, bucket, wire_dtype, launch, on_bytes)

    def _launch(self, tensors, indices, wire_dtype, launch, on_bytes) -> None:
        dtype = wire_dtype or tensors[indices[0]].dtype
        flat = torch.cat([tensors[i].reshape(-1).to(dtype) for i in indices])
        on_bytes(flat.numel() * flat.element_size())
        self._buckets.append((flat, indices, launch(flat)))

    def wait(self) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(self._shapes)
        for flat, indices, work in self._buckets:
            if work is not None:
                work.wait()
            offset = 0
            for i in indices:
                numel = self._shapes[i].numel()
                out[i] = flat[offset : offset + numel].view(self._shapes[i]).to(self._dtypes[i])
                offset += numel
        return out  # type: ignore[return-value]


class Communicator:
    """The process groups of a :class:`WorkPlan` and the collectives K-FAC issues on them."""

    def __init__(self, plan: WorkPlan, rank: int, cap_bytes: int) -> None:
        self.plan = plan
        self.rank = rank
        self.cap_bytes = cap_bytes
        self.bytes_by_kind: dict[str, int] = defaultdict(int)
        self._block_groups: dict[int, Any] = {}  # torch.distributed ProcessGroup objects
        self._receive_groups: dict[int, Any] = {}
        world = plan.world_size
        # new_group is collective: every rank creates every group, in the same order. K-FAC has
        # a world group of its own so that its collectives, launched from backward hooks, never
        # interleave with DDP's all-reduces on one communicator.
        self.world_group = dist.new_group(list(range(world)))
        if 1 < plan.grad_workers < world:
            for index, ranks in enumerate(plan.worker_blocks()):
                self._block_groups[index] = dist.new_group(list(ranks))
            for index, ranks in enumerate(plan.receive_groups()):
                self._receive_groups[index] = dist.new_group(list(ranks))
        elif plan.grad_workers == world:
            self._block_groups[0] = self.world_group
        else:
            self._receive_groups[0] = self.world_group
        # row counts are host data: on a gloo group they need no device synchronisation
        gloo = dist.get_backend(self.world_group) == "gloo"
        self._counts_group = self.world_group if gloo else dist.new_group(list(range(world)), backend="gloo")

    def _counter(self, kind: str) -> Callable[[int], None]:
        def count(nbytes: int) -> None:
            self.bytes_by_kind[kind] += nbytes

        return count

    def reduce_to(self, dst: int, tensors: Sequence[Tensor], wire_dtype: torch.dtype | None) -> PendingCollective:
        """Sum ``tensors`` over all ranks into ``dst`` (other ranks' results are meaningless)."""
        return PendingCollective(
            tensors,
            wire_dtype,
            self.cap_bytes,
            lambda flat: dist.reduce(flat, dst=dst, op=dist.ReduceOp.SUM, group=self.world_group, async_op=True),
            self._counter("factor_reduce"),
        )

    def broadcast_in_block(self, src: int, tensors: Sequence[Tensor]) -> PendingCollective:
        """From an owner to the other gradient workers of its block."""
        group = self._block_groups[self.plan.block_of(src)]
        return PendingCollective(
            tensors,
            None,
            self.cap_bytes,
            lambda flat: dist.broadcast(flat, src=src, group=group, async_op=True),
            self._counter("decomposition_broadcast"),
        )

    def broadcast_in_receive_group(self, src: int, tensors: Sequence[Tensor]) -> PendingCollective:
        """From a gradient worker to the ranks of its receive group."""
        group = self._receive_groups[src % self.plan.grad_workers]
        return PendingCollective(
            tensors,
            None,
            self.cap_bytes,
            lambda flat: dist.broadcast(flat, src=src, group=group, async_op=True),
            self._counter("gradient_broadcast"),
        )

    def broadcast_world(self, src: int, tensors: Sequence[Tensor], kind: str = "state_gather") -> PendingCollective:
        return PendingCollective(
            tensors,
            None,
            self.cap_bytes,
            lambda flat: dist.broadcast(flat, src=src, group=self.world_group, async_op=True),
            self._counter(kind),
        )

    def all_reduce_counts(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a short list of host numbers (row counts, flags), in
        float64 (exact for integers below 2**53); blocking. Issued after the step's factor
        buckets on the same group, so every rank's collectives stay in one order."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        self.bytes_by_kind["counts"] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._counts_group)
        return tensor.tolist()

    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


@dataclass
class FactorBucket:
    """Factors bound for one owner, reduced in one fused collective."""

    owner: int
    entries: list[tuple[str, str]]  # (layer name, "a" or "g")
    pending: PendingCollective | None = None
    #: per layer, the (A rows, G rows, backward passes) recorded when the bucket was launched:
    #: a call after that makes the bucket late
    snapshot: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def layers(self) -> set[str]:
        return {name for name, _ in self.entries}


def plan_factor_buckets(
    backward_order: Sequence[str],
    a_owner: dict[str, int],
    g_owner: dict[str, int],
    nbytes: dict[tuple[str, str], int],
    cap_bytes: int,
) -> list[FactorBucket]:
    """Per owner, consecutive layers in backward order fused up to ``cap_bytes``; the buckets
    ordered by when their last layer completes in backward. Every rank computes the same list,
    and launches strictly in this order, so collectives match across ranks whatever the timing."""
    position = {name: i for i, name in enumerate(backward_order)}
    open_buckets: dict[int, FactorBucket] = {}
    open_sizes: dict[int, int] = {}
    closed: list[FactorBucket] = []
    for name in backward_order:
        for which, owners in (("a", a_owner), ("g", g_owner)):
            owner = owners[name]
            size = nbytes[(name, which)]
            bucket = open_buckets.get(owner)
            if bucket is not None and open_sizes[owner] + size > cap_bytes:
                closed.append(bucket)
                bucket = None
            if bucket is None:
                bucket = open_buckets[owner] = FactorBucket(owner, [])
                open_sizes[owner] = 0
            bucket.entries.append((name, which))
            open_sizes[owner] += size
    closed.extend(open_buckets.values())
    closed.sort(key=lambda b: (max(position[n] for n in b.layers), b.owner))
    return closed


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
