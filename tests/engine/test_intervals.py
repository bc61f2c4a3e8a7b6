"""Fixed intervals count from each layer's last update, with the interval in force: a scheduled
``inv_update_freq`` spaces the inversions as scheduled (counting multiples of the interval left
gaps of up to 1.75x the schedule), and a resumed run keeps the phase of the saved one."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lightning_kfac import KFACPreconditioner
from lightning_kfac.schedules import LinearWarmup
from lightning_kfac.testing.models import MLP


def _inversion_steps(schedule, steps: int) -> list[int]:
    torch.manual_seed(0)
    model = MLP((8, 6, 3))
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_freq=2)
    inverted = []
    for step in range(steps):
        pre.inv_update_freq = max(1, round(schedule(step)))
        before = pre.inversions
        model.zero_grad()
        F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
        pre.step()
        if pre.inversions > before:
            inverted.append(step)
    return inverted


def test_a_scheduled_inversion_interval_is_kept_from_the_last_inversion():
    warmup = LinearWarmup(start=2, end=10, duration=60)
    inverted = _inversion_steps(warmup, 120)
    for previous, current in itertools.pairwise(inverted):
        gap = current - previous
        # the first step at which the interval in force has elapsed since the last inversion
        expected = next(d for d in range(1, 50) if d >= max(1, round(warmup(previous + d))))
        assert gap == expected, (previous, current)
    assert max(b - a for a, b in itertools.pairwise(inverted)) == 10


def test_the_last_updates_travel_in_the_state_and_a_resumed_run_keeps_its_phase():
    torch.manual_seed(1)
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(12)]

    def run(pre: KFACPreconditioner, model, batches) -> list[int]:
        inverted = []
        for x, y in batches:
            before = pre.inversions
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            if pre.inversions > before:
                inverted.append(pre.steps - 1)
        return inverted

    torch.manual_seed(2)
    model = MLP((8, 6, 3))
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_freq=4, factor_update_freq=3)
    uninterrupted = run(pre, model, data)
    torch.manual_seed(2)
    model = MLP((8, 6, 3))
    first = KFACPreconditioner(model, kl_clip=None, inv_update_freq=4, factor_update_freq=3)
    head = run(first, model, data[:5])
    state = first.state_dict()
    assert state["last_updates"]["inversions"] == dict.fromkeys(("net.0", "net.2"), 4)
    first.remove()
    resumed = KFACPreconditioner(model, kl_clip=None)
    resumed.load_state_dict(state)
    assert head + run(resumed, model, data[5:]) == uninterrupted == [0, 4, 8]
