"""Stale statistics wired into the engine: per-layer intervals that grow while factors settle,
shrink when they move, agree on every rank, and match one process on the global batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine.staleness import StalenessConfig
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.models import MLP, SmallCNN, cnn_batches


def _run(model, pre, batches, net=None, rank=0, world=1):
    net = net or model
    local = batches[0][0].shape[0] // world
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(net(x[rank * local : (rank + 1) * local]), y[rank * local : (rank + 1) * local]).backward()
        pre.step()


def test_settled_factors_stretch_intervals_and_save_inversions():
    torch.manual_seed(0)
    fixed_model, adaptive_model = MLP(), MLP()
    adaptive_model.load_state_dict(fixed_model.state_dict())
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    batches = [(x, y)] * 40  # the same batch: factors stop moving after the first updates
    fixed = KFACPreconditioner(fixed_model, kl_clip=None, inv_update_freq=2, factor_update_freq=1, factor_decay=0.5)
    adaptive = KFACPreconditioner(
        adaptive_model, kl_clip=None, inv_update_freq=2, factor_update_freq=1, factor_decay=0.5
    )
    adaptive.staleness = StalenessConfig(threshold=0.01, min_interval=2, max_interval=16)
    _run(fixed_model, fixed, batches)
    _run(adaptive_model, adaptive, batches)
    assert fixed.layer_inversions == 3 * 20
    assert adaptive.layer_inversions < 0.5 * fixed.layer_inversions
    assert all(t.inverse_interval == 16 for t in adaptive.staleness_states.values())
    assert all(t.factor_interval == 8 for t in adaptive.staleness_states.values())  # keeps the 2:1 ratio


def test_sampling_noise_alone_does_not_hold_a_wide_layer_at_short_intervals():
    # i.i.d. batches of 8 rows for a 64-wide layer, weights frozen: the true factors stand still,
    # but each batch factor is a poor estimate, so the running averages keep moving by noise.
    # Raw changes stay above the threshold at every interval; net of noise they fall below it.
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 64, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(200)
    ]
    intervals = {}
    for corrected in (False, True):
        torch.manual_seed(0)
        model = MLP()
        pre = KFACPreconditioner(
            model, kl_clip=None, inv_update_freq=4, factor_update_freq=1, factor_decay=0.9, damping=1e-3
        )
        pre.staleness = StalenessConfig(threshold=0.1, min_interval=4, max_interval=64, noise_corrected=corrected)
        _run(model, pre, batches)
        intervals[corrected] = [t.inverse_interval for t in pre.staleness_states.values()]
    assert max(intervals[False]) <= 8, intervals
    assert min(intervals[True]) >= 32, intervals


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_damped_changes_let_layers_go_stale_where_damping_dominates(method):
    # the same noisy run measured two ways: a damping far above the factors' eigenvalues makes
    # the preconditioner (nearly) damping^-1 I, whatever the factors do, so their changes do
    # not matter; measured against the damped factors they fall below the threshold
    generator = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(16, 64, generator=generator) * (1.0 + (i % 4)), torch.randint(0, 10, (16,), generator=generator))
        for i in range(120)
    ]
    intervals = {}
    for damped in (False, True):
        torch.manual_seed(0)
        model = MLP()
        pre = KFACPreconditioner(
            model, kl_clip=None, damping=100.0, inv_update_freq=4, factor_update_freq=1, inverse_method=method
        )
        pre.staleness = StalenessConfig(
            threshold=0.05, min_interval=4, max_interval=64, noise_corrected=False, damped=damped
        )
        _run(model, pre, batches)
        intervals[damped] = [t.inverse_interval for t in pre.staleness_states.values()]
    assert max(intervals[False]) <= 8, intervals
    assert min(intervals[True]) == 64, intervals


@pytest.mark.parametrize("noise_corrected", [False, True])
def test_the_measured_change_is_that_of_the_damped_factors(noise_corrected):
    # an independent oracle: at each inversion, form A + pi sqrt(l) I and G + sqrt(l)/pi I
    # explicitly from the factors inverted last time and compare the change the engine recorded
    # (net of the noise floor (1 - decay)(1 - decay^T) m from the engine's deviation statistics)
    torch.manual_seed(2)
    model = MLP()
    damping, decay = 0.3, 0.8
    pre = KFACPreconditioner(model, kl_clip=None, damping=damping, inv_update_freq=3, factor_decay=decay)
    pre.staleness = StalenessConfig(threshold=1e-6, min_interval=3, max_interval=3, noise_corrected=noise_corrected)
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    checked = []
    original = pre.schedule.before_inversion

    def observe_and_check(names, *args):
        expected = {}
        for name in names:
            a, g = pre.factors()[name]
            if name in last:
                a_old, g_old = (f.double() for f in last[name])
                pi = math.sqrt(float(a_old.diagonal().mean() / g_old.diagonal().mean()))
                root = math.sqrt(damping)
                eye_a, eye_g = torch.eye(a.shape[0], dtype=torch.float64), torch.eye(g.shape[0], dtype=torch.float64)
                changes = []
                for which, new, old, damped in (
                    ("a", a, a_old, a_old + pi * root * eye_a),
                    ("g", g, g_old, g_old + root / pi * eye_g),
                ):
                    moved_sq = float(torch.linalg.matrix_norm(new.double() - old)) ** 2
                    if noise_corrected:
                        total, finite, updates = pre.schedule.deviation[(name, which)]
                        moved_sq = max(
                            0.0, moved_sq - (1 - decay) * (1 - decay**updates) * float(total) / float(finite)
                        )
                    changes.append(math.sqrt(moved_sq) / float(torch.linalg.matrix_norm(damped)))
                expected[name] = max(changes)
            last[name] = (a.clone(), g.clone())
        original(names, *args)
        for name, value in expected.items():
            assert pre.staleness_states[name].last_change == pytest.approx(value, rel=1e-5)
            checked.append(name)

    pre.schedule.before_inversion = observe_and_check
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)) for _ in range(13)
    ]
    _run(model, pre, batches)
    assert len(checked) >= 3 * 3


def test_adaptive_intervals_refuse_split_factors():
    pre = KFACPreconditioner(MLP(), kl_clip=None, split_factors=True, inverse_method="eigen")
    with pytest.raises(ValueError, match="split_factors=True"):
        pre.staleness = StalenessConfig()


def test_moving_factors_shrink_intervals_back():
    torch.manual_seed(1)
    model = MLP()
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_freq=8, factor_decay=0.0)
    pre.staleness = StalenessConfig(threshold=0.01, min_interval=1, max_interval=64)
    calm = [(torch.ones(16, 64), torch.zeros(16, dtype=torch.long))] * 40
    _run(model, pre, calm)
    grown = {n: t.inverse_interval for n, t in pre.staleness_states.items()}
    assert all(v > 8 for v in grown.values())
    generator = torch.Generator().manual_seed(0)
    stormy = [
        (torch.randn(16, 64, generator=generator) * (10.0 ** (i % 3)), torch.randint(0, 10, (16,), generator=generator))
        for i in range(120)
    ]
    _run(model, pre, stormy)
    assert all(t.inverse_interval < grown[n] for n, t in pre.staleness_states.items())
    assert all(t.shrunk >= 1 for t in pre.staleness_states.values())


def _adaptive_run(rank, world_size, fraction, config=None):
    torch.manual_seed(0)
    model = SmallCNN().double()
    net = DistributedDataParallel(model) if world_size > 1 else model
    pre = KFACPreconditioner(
        model,
        lr=0.1,
        inv_update_freq=2,
        factor_update_freq=1,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
        grad_worker_fraction=fraction,
    )
    pre.staleness = config or StalenessConfig(threshold=0.2, min_interval=2, max_interval=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    holds = []
    for x, y in cnn_batches(16, 8, torch.float64):
        local = 8 // world_size
        optimizer.zero_grad()
        F.cross_entropy(net(x[rank * local : (rank + 1) * local]), y[rank * local : (rank + 1) * local]).backward()
        pre.step()
        optimizer.step()
        if config is not None:  # what a checkpoint written now would hold (collective)
            holds.append({n: saved["tracker"]["holds"] for n, saved in pre.state_dict()["adaptive"].items()})
    intervals = {n: (t.inverse_interval, t.factor_interval) for n, t in pre.staleness_states.items()}
    if config is not None:
        intervals["holds"] = holds
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), intervals, pre.layer_inversions


def test_ranks_agree_on_intervals_and_match_one_process():
    reference, ref_intervals, ref_inversions = _adaptive_run(0, 1, 1.0)
    for fraction in (1.0, 0.5):
        (p0, i0, n0), (p1, i1, n1) = run_distributed(_adaptive_run, 2, fraction)
        assert torch.equal(p0, p1) and i0 == i1 and n0 == n1
        assert i0 == ref_intervals and n0 == ref_inversions
        assert float((p0 - reference).norm() / reference.norm()) < 1e-9


def test_every_rank_learns_the_owners_hold_streaks():
    # with probes the owner's count of consecutive holds decides future intervals; every rank
    # must carry it (a checkpoint is written from rank 0, whatever rank owns the layer)
    config = StalenessConfig(threshold=1e-6, shrink_threshold=1e6, min_interval=1, max_interval=64, probe_after=3)
    reference, ref_intervals, _ = _adaptive_run(0, 1, 1.0, config)
    (p0, i0, _), (p1, i1, _) = run_distributed(_adaptive_run, 2, 1.0, config)
    assert torch.equal(p0, p1) and i0 == i1 == ref_intervals
    assert max(max(h.values()) for h in ref_intervals["holds"]) == 2  # streaks formed and probes reset them
    assert float((p0 - reference).norm() / reference.norm()) < 1e-9
