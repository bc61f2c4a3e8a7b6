"""Who owns which factor and who preconditions which layer.

Owners are chosen by greedy longest-processing-time (LPT) scheduling on the decomposition cost,
which Graham (1969) bounds by 4/3 of the optimum; equal-count chunking (the Osawa et al. code)
and full replication (KAISA's factors) are both special cases it improves on.

Gradient workers follow KAISA: with ``n`` workers per layer the ranks form ``world/n`` blocks of
``n`` consecutive ranks. A layer is preconditioned by the block that holds its owner; every
other rank receives the preconditioned gradient from the member of that block with the same
position (``rank % n``), so each receive group holds exactly one worker of each block.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


def factor_cost(dim: int, cost: str) -> float:
    """Decomposition cost (~n^3) or storage cost (~n^2) of one n x n factor."""
    return float(dim) ** 3 if cost == "compute" else float(dim) ** 2


def lpt_assign(costs: Sequence[float], world_size: int) -> tuple[list[int], list[float]]:
    """Assign tasks to ranks, largest first, each to the least-loaded rank (ties: lowest rank).

    Returns the owner of every task and the load of every rank. Deterministic, so every rank
    computes the same plan without communicating.
    """
    return _lpt_continue(costs, [0.0] * world_size)


def _lpt_continue(costs: Sequence[float], loads: list[float]) -> tuple[list[int], list[float]]:
    """:func:`lpt_assign` starting from the given per-rank ``loads`` (updated and returned)."""
    owners = [0] * len(costs)
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    for task in order:
        load, rank = heapq.heappop(heap)
        owners[task] = rank
        loads[rank] = load + costs[task]
        heapq.heappush(heap, (loads[rank], rank))
    return owners, loads


def balance_lower_bound(costs: Sequence[float], world_size: int) -> float:
    """No assignment of indivisible tasks beats max(total / world, largest task)."""
    if not costs:
        return 0.0
    return max(sum(costs) / world_size, max(costs))


@dataclass(frozen=True)
class LayerShape:
    name: str
    a_dim: int
    g_dim: int


@dataclass(frozen=True)
class WorkPlan:
    """The placement of every layer's factors, decompositions and preconditioning."""

    world_size: int
    grad_workers: int
    a_owner: dict[str, int]
    g_owner: dict[str, int]
    loads: tuple[float, ...]
    cost: str = "compute"
    split_factors: bool = False

    @classmethod
    def build(
        cls,
        layers: Sequence[LayerShape],
        world_size: int,
        grad_workers: int,
        cost: str = "compute",
        split_factors: bool = False,
    ) -> WorkPlan:
        empty = cls(world_size, grad_workers, {}, {}, tuple(0.0 for _ in range(world_size)), cost, split_factors)
        return empty.extended(layers)

    def extended(self, layers: Sequence[LayerShape]) -> WorkPlan:
        """This plan with ``layers`` (not yet in it) added: largest first, each to the least
        loaded rank given the loads so far, so that a plan grown in steps is balanced like one
        built at once, and one built from nothing is :func:`lpt_assign`'s. The owners already
        chosen stay (their factors live there)."""
        if self.split_factors:
            tasks = [
                (layer.name, side, dim) for layer in layers for side, dim in (("a", layer.a_dim), ("g", layer.g_dim))
            ]
            costs = [factor_cost(dim, self.cost) for _, _, dim in tasks]
        else:
            tasks = [(layer.name, "ag", 0) for layer in layers]
            costs = [factor_cost(layer.a_dim, self.cost) + factor_cost(layer.g_dim, self.cost) for layer in layers]
        owners, loads = _lpt_continue(costs, list(self.loads))
        a_owner, g_owner = dict(self.a_owner), dict(self.g_owner)
        for (name, side, _), owner in zip(tasks, owners, strict=True):
            if "a" in side:
                a_owner[name] = owner
            if "g" in side:
                g_owner[name] = owner
        return WorkPlan(
            self.world_size, self.grad_workers, a_owner, g_owner, tuple(loads), self.cost, self.split_factors
        )

    @property
    def layer_names(self) -> list[str]:
        return list(self.a_owner)

    # --- groups ------------------------------------------------------------------------------
    def worker_blocks(self) -> list[tuple[int, ...]]:
        n = self.grad_workers
        return [tuple(range(start, start + n)) for start in range(0, self.world_size, n)]

    def receive_groups(self) -> list[tuple[int, ...]]:
        n = self.grad_workers
        return [tuple(range(position, self.world_size, n)) for position in range(n)]

    def block_of(self, rank: int) -> int:
        return rank // self.grad_workers

    def grad_worker_ranks(self, name: str) -> tuple[int, ...]:
        block = self.block_of(self.a_owner[name])
        return tuple(range(block * self.grad_workers, (block + 1) * self.grad_workers))

    def is_grad_worker(self, name: str, rank: int) -> bool:
        return self.block_of(rank) == self.block_of(self.a_owner[name])

    def gradient_source(self, name: str, rank: int) -> int:
        """The grad worker of ``name`` in ``rank``'s receive group."""
        return self.block_of(self.a_owner[name]) * self.grad_workers + rank % self.grad_workers

    @property
    def mode(self) -> str:
        if self.grad_workers == self.world_size:
            return "COMM-OPT"
        if self.grad_workers == 1:
            return "MEM-OPT"
        return "HYBRID"

    def max_over_mean_load(self) -> float:
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0
