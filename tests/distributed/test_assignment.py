"""Owner assignment against brute force: greedy longest-processing-time (largest first, to the
least-loaded rank) is within Graham's bound 4/3 - 1/(3m) of the optimal makespan, and a plan
grown in steps stays a valid LPT continuation."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan, balance_lower_bound, lpt_assign


def _optimal_makespan(costs: list[float], ranks: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(ranks), repeat=len(costs)):
        loads = [0.0] * ranks
        for cost, owner in zip(costs, owners, strict=True):
            loads[owner] += cost
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("ranks", [2, 3])
def test_greedy_assignment_is_within_grahams_bound_of_the_optimum(ranks):
    rng = random.Random(ranks)
    worst = 1.0
    for _ in range(150):
        costs = [float(rng.choice([1, 2, 3, 5, 8, 13])) for _ in range(rng.randint(ranks + 1, 8))]
        _, loads = lpt_assign(costs, ranks)
        optimum = _optimal_makespan(costs, ranks)
        worst = max(worst, max(loads) / optimum)
        assert max(loads) <= (4 / 3 - 1 / (3 * ranks)) * optimum + 1e-9, costs
    assert worst > 1.0  # the instances are hard enough to separate greedy orders


def test_largest_first_beats_the_order_given():
    # ascending costs on 2 ranks: taken in the given order the big task lands on a loaded rank
    # (loads 6 and 2); largest first it goes alone and the small ones fill the other rank (4, 4)
    costs = [1.0, 1.0, 1.0, 1.0, 4.0]
    owners, loads = lpt_assign(costs, 2)
    assert max(loads) == 4.0 == balance_lower_bound(costs, 2)
    assert owners == [1, 1, 1, 1, 0]


def test_a_plan_grown_in_steps_keeps_its_owners_and_balances_the_rest():
    layers = [LayerShape(f"l{i}", 20 + 7 * i, 10 + i) for i in range(6)]
    first = WorkPlan.build(layers[:3], world_size=2, grad_workers=1)
    grown = first.extended(layers[3:])
    assert all(grown.a_owner[n] == first.a_owner[n] for n in first.a_owner)
    assert set(grown.a_owner) == {layer.name for layer in layers}
    assert max(grown.loads) <= 1.34 * balance_lower_bound(
        [a**3 + g**3 for a, g in ((x.a_dim, x.g_dim) for x in layers)], 2
    )
