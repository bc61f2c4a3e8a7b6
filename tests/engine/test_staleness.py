"""Stale statistics policy: interval logic on synthetic factor sequences (pure torch)."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from lightning_kfac.engine.staleness import (
    LayerStaleness,
    StalenessConfig,
    corrected_relative_change,
    noise_floor_sq,
    relative_change,
    shifted_norm,
)


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(threshold=0), ValueError, ["threshold", "0", "> 0"]),
        (dict(threshold="0.1"), TypeError, ["threshold", "'0.1'"]),
        (dict(min_interval=0), ValueError, ["min_interval", ">= 1", "0"]),
        (dict(min_interval=2.0), TypeError, ["min_interval", "2.0"]),
        (dict(min_interval=10, max_interval=5), ValueError, ["max_interval", "min_interval=10", "5"]),
        (dict(growth=1.0), ValueError, ["growth", "> 1", "1.0"]),
        (dict(shrink=1.0), ValueError, ["shrink", "[0, 1)", "1.0"]),
        (dict(shrink=-0.5), ValueError, ["shrink", "-0.5"]),
        (dict(threshold=0.1, shrink_threshold=0.05), ValueError, ["shrink_threshold", "threshold=0.1", "0.05"]),
        (dict(threshold=float("inf")), ValueError, ["threshold", "finite"]),
        (dict(noise_corrected=1), TypeError, ["noise_corrected", "True or False", "1"]),
        (dict(damped="yes"), TypeError, ["damped", "True or False", "'yes'"]),
        (dict(max_factor_interval=0), ValueError, ["max_factor_interval", ">= 1", "0"]),
        (dict(probe_after=0), ValueError, ["probe_after", ">= 1", "0"]),
        (dict(probe_after=1.5), TypeError, ["probe_after", "1.5"]),
    ],
)
def test_config_validates_itself(kwargs, error, words):
    with pytest.raises(error) as info:
        StalenessConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_config_is_frozen_and_scalar():
    config = StalenessConfig(threshold=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.2  # type: ignore[misc]
    assert config.upper_threshold == pytest.approx(0.2)  # growth x threshold by default
    assert StalenessConfig(threshold=0.1, shrink_threshold=0.5).upper_threshold == 0.5
    assert all(isinstance(v, (int, float, type(None))) for v in config.state_dict().values())
    assert StalenessConfig(**config.state_dict()) == config


# --- relative change ----------------------------------------------------------------------------
def test_relative_change():
    old = torch.eye(3)
    assert float(relative_change(old.clone(), old)) == 0.0
    new = old * 1.1
    assert float(relative_change(new, old)) == pytest.approx(0.1)
    assert float(relative_change(torch.zeros(3, 3), torch.zeros(3, 3))) == 0.0
    assert math.isinf(float(relative_change(old, torch.zeros(3, 3))))
    change = relative_change(new.half(), old.half())
    assert change.dtype == torch.float64 and change.dim() == 0
    with pytest.raises(ValueError, match="one shape"):
        relative_change(torch.eye(2), torch.eye(3))


def test_damped_change_is_measured_against_the_damped_factor():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    old = x.T @ x / 20
    new = old + 0.05 * torch.randn(6, 6, generator=generator, dtype=torch.float64)
    for shift in (0.0, 0.3, torch.tensor(2.5, dtype=torch.float64)):
        explicit = old + float(shift) * torch.eye(6, dtype=torch.float64)
        assert float(shifted_norm(old, shift)) == pytest.approx(float(torch.linalg.matrix_norm(explicit)), rel=1e-12)
        expected = float(torch.linalg.matrix_norm(new - old) / torch.linalg.matrix_norm(explicit))
        assert float(relative_change(new, old, shift)) == pytest.approx(expected, rel=1e-12)
        # no noise: the corrected change is the plain one
        assert float(corrected_relative_change(new, old, 0.0, 0.9, 5, shift)) == pytest.approx(expected, rel=1e-12)
    # a diagonal factor given as a vector: the same as its matrix
    diagonal = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    assert float(shifted_norm(diagonal, 0.7)) == pytest.approx(
        float(torch.linalg.matrix_norm(torch.diag(diagonal + 0.7))), rel=1e-12
    )
    # a shift far beyond the factor (a factor near zero gets a huge share of the damping) stays finite
    assert float(shifted_norm(old, 1e200)) == pytest.approx(1e200 * math.sqrt(6), rel=1e-12)
    # damping that dwarfs the factor makes its change negligible
    assert float(relative_change(new, old, 1e3)) < 1e-2 * float(relative_change(new, old))


# --- interval logic -----------------------------------------------------------------------------
def test_intervals_grow_while_factors_are_stable_and_stop_at_max():
    state = LayerStaleness(StalenessConfig(threshold=0.05, min_interval=2, max_interval=100), inverse_interval=10)
    intervals = [state.observe(0.0) for _ in range(6)]
    assert intervals == [20, 40, 80, 100, 100, 100]
    assert state.grown == 4 and state.shrunk == 0 and state.observations == 6


def test_intervals_shrink_when_factors_change_again_and_stop_at_min():
    state = LayerStaleness(
        StalenessConfig(threshold=0.05, min_interval=2, max_interval=100, shrink=0.5), inverse_interval=80
    )
    assert [state.observe(0.5) for _ in range(6)] == [40, 20, 10, 5, 2, 2]
    reset = LayerStaleness(StalenessConfig(threshold=0.05, min_interval=3, shrink=0.0), inverse_interval=64)
    assert reset.observe(1.0) == 3  # shrink=0: straight back to min_interval


def test_nan_or_inf_change_counts_as_a_change():
    state = LayerStaleness(StalenessConfig(min_interval=1), inverse_interval=8)
    assert state.observe(float("nan")) == 4
    assert state.observe(torch.tensor(float("inf"))) == 2


def test_between_the_thresholds_the_interval_holds():
    state = LayerStaleness(StalenessConfig(threshold=0.05, shrink_threshold=0.2), inverse_interval=10)
    assert [state.observe(c) for c in (0.05, 0.1, 0.2)] == [10, 10, 10]
    assert state.observe(0.21) == 5


def test_growth_always_moves_by_at_least_one_step():
    state = LayerStaleness(StalenessConfig(growth=1.1, max_interval=5), inverse_interval=1)
    assert [state.observe(0.0) for _ in range(5)] == [2, 3, 4, 5, 5]


def test_starting_interval_is_clamped_and_factor_interval_follows_the_ratio():
    config = StalenessConfig(min_interval=4, max_interval=64)
    assert LayerStaleness(config, inverse_interval=1).inverse_interval == 4
    assert LayerStaleness(config, inverse_interval=1000).inverse_interval == 64
    state = LayerStaleness(config, inverse_interval=10, factor_interval=1)  # ratio 10
    assert (state.inverse_interval, state.factor_interval) == (10, 1)
    state.observe(0.0)
    state.observe(0.0)
    assert (state.inverse_interval, state.factor_interval) == (40, 4)
    assert LayerStaleness(config, inverse_interval=10, factor_interval=5).factor_interval == 5  # ratio 2
    with pytest.raises(ValueError, match="inverse_interval"):
        LayerStaleness(config, inverse_interval=0)
    with pytest.raises(TypeError, match="StalenessConfig"):
        LayerStaleness({"threshold": 0.1})  # type: ignore[arg-type]


def _through_a_checkpoint(state: LayerStaleness) -> LayerStaleness:
    """A fresh tracker (another starting interval) loaded from ``state`` saved weights-only."""
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    other = LayerStaleness(state.config, inverse_interval=3)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    return other


def test_state_round_trips_through_a_weights_only_checkpoint():
    state = LayerStaleness(StalenessConfig(threshold=0.05), inverse_interval=10)
    for change in (0.0, 0.0, 0.3, 0.01):
        state.observe(change)
    other = _through_a_checkpoint(state)
    assert other.state_dict() == state.state_dict()
    assert other.observe(0.0) == state.observe(0.0)


def test_a_resumed_tracker_continues_its_hold_streak():
    config = StalenessConfig(threshold=0.1, probe_after=3)
    uninterrupted, first_half = LayerStaleness(config, inverse_interval=8), LayerStaleness(config, inverse_interval=8)
    for change in (0.15, 0.15):  # two holds in the band [0.1, 0.2]
        uninterrupted.observe(change)
        first_half.observe(change)
    resumed = _through_a_checkpoint(first_half)
    assert resumed.holds == 2
    assert resumed.observe(0.15) == uninterrupted.observe(0.15) == 16  # the third hold probes
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_probe_after_counts_only_consecutive_holds_in_the_band():
    config = StalenessConfig(threshold=0.1, probe_after=2, min_interval=1, max_interval=64)
    state = LayerStaleness(config, inverse_interval=8)
    trace = [state.observe(c) for c in (0.15, 0.05, 0.15, 0.3, 0.15, 0.15, 0.15, 0.15)]
    # hold, grow (resets the streak), hold, shrink (resets), hold, probe, hold, probe
    assert trace == [8, 16, 16, 8, 8, 16, 16, 32]
    at_max = LayerStaleness(config, inverse_interval=64)
    assert [at_max.observe(0.15) for _ in range(3)] == [64, 64, 64]  # a probe cannot pass max_interval
    without = LayerStaleness(StalenessConfig(threshold=0.1), inverse_interval=8)
    assert [without.observe(0.15) for _ in range(5)] == [8] * 5


# --- synthetic factor sequences -----------------------------------------------------------------
def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (4 * n)


def _simulate(factor_at, config, steps, start_interval=10):
    """Invert when due; at each inversion measure the change since the previous one."""
    state = LayerStaleness(config, inverse_interval=start_interval)
    inversions, intervals, last, next_due = [], [], None, 0
    for step in range(steps):
        if step < next_due:
            continue
        factor = factor_at(step)
        if last is not None:
            state.observe(relative_change(factor, last))
        last = factor
        inversions.append(step)
        intervals.append(state.inverse_interval)
        next_due = step + state.inverse_interval
    return inversions, intervals


def test_synthetic_sequence_intervals_grow_as_factors_settle_and_shrink_on_a_shift():
    """Factors drift fast, then settle (exponentially), then jump (a new phase of training),
    then settle again: intervals grow while the factors settle, shrink after the jump, and
    always stay within the bounds."""
    base, direction, shifted = _spd(6, 0), _spd(6, 1), _spd(6, 2)

    def factor_at(step: int) -> torch.Tensor:
        if step < 2000:
            return base + 5.0 * math.exp(-step / 100) * direction
        return shifted + 5.0 * math.exp(-(step - 2000) / 100) * direction

    config = StalenessConfig(threshold=0.05, min_interval=2, max_interval=256)
    inversions, intervals = _simulate(factor_at, config, 4000)
    assert all(config.min_interval <= i <= config.max_interval for i in intervals)
    before_shift = [i for s, i in zip(inversions, intervals, strict=True) if s < 2000]
    assert before_shift[-1] == config.max_interval  # settled: grown to the cap
    assert max(before_shift[:10]) == 10  # early, fast drift: no growth yet
    right_after = [i for s, i in zip(inversions, intervals, strict=True) if 2000 <= s < 2300]
    assert min(right_after) <= 16  # the jump shrank it
    assert intervals[-1] == config.max_interval  # and it grew back
    # far fewer inversions than the fixed interval of 10 over the same run
    assert len(inversions) < 0.4 * (4000 // 10)


def test_steady_drift_settles_on_one_interval_instead_of_oscillating():
    base, direction = _spd(5, 3), _spd(5, 4)
    rate = 1e-3  # change between inversions is ~ rate * interval * |direction| / |base|

    def factor_at(step: int) -> torch.Tensor:
        return base + rate * step * direction

    _, intervals = _simulate(factor_at, StalenessConfig(threshold=0.05, max_interval=10_000), 20_000, start_interval=1)
    tail = intervals[-10:]
    assert len(set(tail)) == 1  # settled (the band between threshold and growth x threshold)
    assert 1 < tail[0] < 10_000


def _unit_symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    x = x + x.T
    return x / torch.linalg.matrix_norm(x)


@pytest.mark.parametrize("probe_after", [None, 2])
def test_probes_tell_fluctuation_from_drift(probe_after):
    """Two layers whose changes sit in the hold band [0.1, 0.2] at interval 8. One fluctuates
    about a fixed level: a fresh, independent perturbation at every step, so the change between
    any two inversions is ~0.15 however far apart they are. The other drifts at a steady rate:
    0.15 at interval 8, 0.32 at 16. Without probes both hold at 8. With probes the fluctuating
    layer climbs to the cap (its change does not grow with the interval) while the drifting one
    comes straight back from every probe and never goes past 16."""
    base = torch.eye(24, dtype=torch.float64)
    scale = 0.15 * float(torch.linalg.matrix_norm(base)) / math.sqrt(2.0)  # ||e_s - e_t|| ~ sqrt(2)

    def fluctuating(step: int) -> torch.Tensor:
        return base + scale * _unit_symmetric(24, 1000 + step)

    def drifting(step: int) -> torch.Tensor:  # grows by 15% every 8 steps: the change is 1.15^(T/8) - 1
        return base * 1.15 ** (step / 8)

    config = StalenessConfig(threshold=0.1, min_interval=2, max_interval=256, probe_after=probe_after)
    _, noisy = _simulate(fluctuating, config, 3000, start_interval=8)
    _, steady = _simulate(drifting, config, 800, start_interval=8)
    if probe_after is None:
        assert set(noisy) == {8} and set(steady) == {8}
        return
    # the first entry is the starting interval; then every second change in the band probes
    assert noisy[:12] == [8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 256, 256] and noisy[-1] == 256
    assert max(steady) == 16 and steady[:9] == [8, 8, 16, 8, 8, 16, 8, 8, 16]  # every probe came back


# --- sampling-noise correction ------------------------------------------------------------------
def _ema_run(steps: int, decay: float, dim: int, rows: int, drift_per_step: float, generator: torch.Generator):
    """Running averages of batch covariances from `rows` samples of N(0, S_t), with S_t drifting
    along a fixed direction; returns the running values and each update's ||B_t - A_(t-1)||^2."""
    base = torch.diag(torch.linspace(1.0, 2.0, dim, dtype=torch.float64))
    direction = torch.zeros(dim, dim, dtype=torch.float64)
    direction[0, 0] = 1.0
    running, history, deviations = None, [], []
    for t in range(steps):
        cov = base + drift_per_step * t * direction
        x = torch.randn(rows, dim, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        batch = x.T @ x / rows
        if running is not None:
            deviations.append(float(torch.linalg.vector_norm(batch - running) ** 2))
        running = batch.clone() if running is None else decay * running + (1 - decay) * batch
        history.append(running)
    return history, deviations


def test_noise_floor_matches_the_monte_carlo_change_of_a_stationary_running_average():
    # an independent check of the formula: simulate the stationary process many times and
    # compare E||A_t - A_(t-T)||^2 with (1 - decay)(1 - decay^T) E||B_t - A_(t-1)||^2
    generator = torch.Generator().manual_seed(0)
    decay, interval = 0.9, 8
    observed, predicted = [], []
    for _ in range(40):
        history, deviations = _ema_run(120, decay, 12, 16, 0.0, generator)
        observed.append(float(torch.linalg.vector_norm(history[-1] - history[-1 - interval]) ** 2))
        predicted.append(float(noise_floor_sq(sum(deviations[-interval:]) / interval, decay, interval)))
    ratio = (sum(observed) / len(observed)) / (sum(predicted) / len(predicted))
    assert 0.8 < ratio < 1.25, ratio
    assert noise_floor_sq(3.0, 0.5, 0) == 0.0


def test_noise_correction_sees_through_sampling_noise_and_keeps_real_drift():
    generator = torch.Generator().manual_seed(1)
    decay, interval = 0.95, 20
    # stationary factors from few rows: the raw change is large, the corrected one is small
    history, deviations = _ema_run(200, decay, 16, 8, 0.0, generator)
    new, old = history[-1], history[-1 - interval]
    mean_deviation = sum(deviations[-interval:]) / interval
    raw = float(relative_change(new, old))
    corrected = float(corrected_relative_change(new, old, mean_deviation, decay, interval))
    assert raw > 0.1
    assert corrected < 0.5 * raw
    # a drift well above the noise survives the correction: the true relative change of S over
    # the window is 20 * 0.05 / ||S_old||_F; the EMA sees it with a lag, so it is read at
    # within a factor of two
    history, deviations = _ema_run(200, decay, 16, 4000, 0.05, generator)
    new, old = history[-1], history[-1 - interval]
    mean_deviation = sum(deviations[-interval:]) / interval
    corrected = float(corrected_relative_change(new, old, mean_deviation, decay, interval))
    s_old = torch.diag(torch.linspace(1.0, 2.0, 16, dtype=torch.float64))
    s_old[0, 0] += 0.05 * (199 - interval)
    true_change = 0.05 * interval / float(torch.linalg.vector_norm(s_old))
    assert 0.5 * true_change < corrected < 1.5 * true_change, (corrected, true_change)
    assert corrected > 0.9 * float(relative_change(new, old))


def test_corrected_change_conventions():
    old = torch.eye(3)
    assert float(corrected_relative_change(old.clone(), old, 0.0, 0.9, 5)) == 0.0
    # a difference the noise fully explains reads as no change
    assert float(corrected_relative_change(old * 1.1, old, 1e6, 0.9, 5)) == 0.0
    zero = torch.zeros(3, 3)
    assert float(corrected_relative_change(zero, zero, 0.0, 0.9, 5)) == 0.0
    assert math.isinf(float(corrected_relative_change(old, zero, 0.0, 0.9, 5)))
    with pytest.raises(ValueError, match="one shape"):
        corrected_relative_change(torch.eye(2), torch.eye(3), 0.0, 0.9, 1)


def test_factor_interval_cap_keeps_running_averages_fresh_under_long_inversion_intervals():
    capped = LayerStaleness(StalenessConfig(threshold=0.1, max_interval=320, max_factor_interval=10), 10, 1)
    free = LayerStaleness(StalenessConfig(threshold=0.1, max_interval=320), 10, 1)
    for tracker in (capped, free):
        for _ in range(6):
            tracker.observe(0.0)
    assert capped.inverse_interval == free.inverse_interval == 320
    assert (capped.factor_interval, free.factor_interval) == (10, 32)
