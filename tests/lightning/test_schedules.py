"""Hyperparameter schedules: values at given steps, validation, checkpoint round trips, yaml."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lightning_kfac.callback import KFACCallback
from lightning_kfac.engine import hyperparameters as rules
from lightning_kfac.schedules import (
    Constant,
    Cosine,
    ExponentialDecay,
    LinearWarmup,
    Schedule,
    StepDecay,
    schedule_from_state,
)


def _values(schedule, steps):
    return [schedule(s) for s in steps]


# --- values -------------------------------------------------------------------------------------
def test_constant():
    assert _values(Constant(0.5), [0, 1, 10**6]) == [0.5, 0.5, 0.5]


def test_step_decay_in_steps():
    s = StepDecay(initial=1.0, milestones=[10, 20], gamma=0.1)
    assert _values(s, [0, 9, 10, 19, 20, 1000]) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_step_decay_in_epochs_maps_milestones_to_the_first_step_of_the_epoch():
    s = StepDecay(initial=0.003, milestones=[2, 4], gamma=0.5, unit="epoch").bind(steps_per_epoch=5)
    # epoch e covers steps 5e .. 5e+4
    assert _values(s, [0, 9, 10, 19, 20, 50]) == pytest.approx([0.003, 0.003, 0.0015, 0.0015, 0.00075, 0.00075])
    with pytest.raises(ValueError, match="steps per epoch"):
        StepDecay(1.0, [1], unit="epoch")(3)
    # without steps per epoch, an explicit (integer) epoch works too
    assert StepDecay(1.0, [1], 0.5, unit="epoch")(3, epoch=1) == 0.5


def test_exponential_decay_with_floor_and_staircase():
    s = ExponentialDecay(initial=1.0, rate=0.5, period=10)
    assert _values(s, [0, 5, 10, 20]) == pytest.approx([1.0, 0.5**0.5, 0.5, 0.25])
    floored = ExponentialDecay(initial=1.0, rate=0.5, period=10, floor=0.3)
    assert _values(floored, [0, 10, 20, 100]) == pytest.approx([1.0, 0.5, 0.3, 0.3])
    stairs = ExponentialDecay(initial=1.0, rate=0.5, period=10, staircase=True)
    assert _values(stairs, [0, 9, 10, 19, 20]) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])
    growing = ExponentialDecay(initial=1.0, rate=2.0, floor=5.0)  # floor is a ceiling when growing
    assert _values(growing, [0, 1, 2, 3, 10]) == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])


def test_linear_warmup_both_directions_and_delay():
    up = LinearWarmup(start=0.0, end=1.0, duration=10)
    assert _values(up, [0, 5, 10, 100]) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    down = LinearWarmup(start=0.1, end=0.001, duration=4, delay=2)
    assert _values(down, [0, 2, 4, 6, 9]) == pytest.approx([0.1, 0.1, 0.0505, 0.001, 0.001])


def test_cosine():
    s = Cosine(start=1.0, end=0.0, duration=100)
    assert _values(s, [0, 25, 50, 100, 200]) == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.0, 0.0])


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: Constant("a"), TypeError, ["value", "'a'"]),
        (lambda: Constant(float("nan")), ValueError, ["value", "nan", "finite"]),
        (lambda: StepDecay(1.0, [20, 10]), ValueError, ["milestones", "[20, 10]", "increasing"]),
        (lambda: StepDecay(1.0, "10"), TypeError, ["milestones"]),
        (lambda: StepDecay(1.0, [10], gamma=0), ValueError, ["gamma", "0", "> 0"]),
        (lambda: StepDecay(1.0, [10], unit="epochs"), ValueError, ["unit", "'epochs'", "'epoch'"]),
        (lambda: ExponentialDecay(1.0, rate=-0.5), ValueError, ["rate", "-0.5"]),
        (lambda: ExponentialDecay(1.0, 0.5, period=0), ValueError, ["period"]),
        (lambda: ExponentialDecay(1.0, 0.5, staircase="yes"), TypeError, ["staircase"]),
        (lambda: LinearWarmup(0.0, 1.0, duration=0), ValueError, ["duration"]),
        (lambda: LinearWarmup(0.0, 1.0, 10, delay=-1), ValueError, ["delay", "-1"]),
        (lambda: Cosine(1.0, 0.0, duration=-5), ValueError, ["duration", "-5"]),
        (lambda: Constant(1.0).bind(0), ValueError, ["steps_per_epoch", "0"]),
    ],
)
def test_schedules_validate_their_arguments(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)


# --- checkpoint state ---------------------------------------------------------------------------
ALL = [
    Constant(0.25),
    StepDecay(initial=0.003, milestones=[40, 80], gamma=0.5, unit="epoch"),
    ExponentialDecay(initial=1e-2, rate=0.9, period=5, floor=1e-4, staircase=True),
    LinearWarmup(start=1e-1, end=1e-3, duration=100, delay=10),
    Cosine(start=0.95, end=0.99, duration=1000, unit="step"),
]


def _weights_only_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_every_schedule_round_trips_through_a_weights_only_checkpoint(schedule):
    schedule.bind(7)
    restored = schedule_from_state(_weights_only_round_trip(schedule.state_dict()))
    assert type(restored) is type(schedule) and restored == schedule
    steps = [0, 1, 6, 7, 13, 70, 280, 560, 5000]
    assert _values(restored, steps) == _values(schedule, steps)


def test_unknown_or_callable_state_is_not_rebuilt():
    assert schedule_from_state({"class": "NoSuchSchedule", "init_args": {}}) is None
    assert schedule_from_state({"class": None, "init_args": {}}) is None


# --- through the callback -----------------------------------------------------------------------
def test_callback_accepts_constants_callables_and_schedules():
    cb = KFACCallback(
        damping=lambda step: 1e-2 if step < 100 else 1e-3,
        factor_update_freq=2,
        inv_update_freq=ExponentialDecay(initial=100, rate=0.5, period=10),
        factor_decay=Cosine(start=0.9, end=0.99, duration=100),
        kl_clip=None,
    )
    hp = cb.hyperparameters(0)
    assert hp == {
        "damping": 1e-2,
        "factor_update_freq": 2,
        "inv_update_freq": 100,
        "factor_decay": 0.9,
        "kl_clip": None,
    }
    later = cb.hyperparameters(200)
    assert later["damping"] == 1e-3 and later["factor_decay"] == pytest.approx(0.99)
    freqs = [cb.hyperparameters(10 * k)["inv_update_freq"] for k in range(10)]
    # 100, 50, 25, 12.5, 6.25, ... rounded half up, never below 1, always ints
    assert freqs == [100, 50, 25, 13, 6, 3, 2, 1, 1, 1]
    assert all(type(f) is int for f in freqs)


def test_callback_frequencies_are_rounded_ints_at_least_one_even_from_callables():
    cb = KFACCallback(inv_update_freq=lambda step: 7.6 - step, factor_update_freq=LinearWarmup(1, 4, 3))
    assert [cb.hyperparameters(s)["inv_update_freq"] for s in (0, 1, 6, 10)] == [8, 7, 2, 1]
    assert [cb.hyperparameters(s)["factor_update_freq"] for s in (0, 1, 2, 3)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(damping=0.0), ValueError, ["damping", "0.0", "> 0"]),
        (dict(damping="1e-3"), TypeError, ["damping", "'1e-3'"]),
        (dict(damping=Constant(-1.0)), ValueError, ["damping", "Constant(value=-1.0)", "> 0"]),
        (dict(damping=LinearWarmup(1e-2, -1e-3, 10)), ValueError, ["damping", "LinearWarmup", "-0.001"]),
        (dict(factor_decay=Cosine(0.9, 1.0, 10)), ValueError, ["factor_decay", "[0, 1)", "1.0"]),
        (dict(inv_update_freq=10.0), TypeError, ["inv_update_freq", "10.0", "write 10"]),
        (dict(inv_update_freq=0), ValueError, ["inv_update_freq", ">= 1"]),
        (dict(inv_update_freq=StepDecay(-10, [5], gamma=2.0)), ValueError, ["inv_update_freq", "StepDecay", "-10"]),
        (dict(factor_update_freq=Constant(0)), ValueError, ["factor_update_freq", "> 0"]),
        (dict(kl_clip=Constant(0.0)), ValueError, ["kl_clip", "> 0"]),
        (dict(damping=None), TypeError, ["damping", "None"]),
        (dict(adaptive={"threshold": 0.1}), TypeError, ["adaptive", "StalenessConfig"]),
        (dict(log="yes"), TypeError, ["log", "'yes'", "bool"]),
    ],
)
def test_callback_validates_hyperparameters(kwargs, error, words):
    with pytest.raises(error) as info:
        KFACCallback(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_callable_that_leaves_the_range_is_reported_with_the_step():
    cb = KFACCallback(damping=lambda step: 1e-3 - 1e-4 * step)
    assert cb.hyperparameters(5)["damping"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match=r"damping .* gave .* at step 10"):
        cb.hyperparameters(10)


def test_callback_state_round_trips_schedules_through_weights_only():
    cb = KFACCallback(
        damping=StepDecay(initial=0.003, milestones=[2, 4], gamma=0.5, unit="epoch"),
        inv_update_freq=ExponentialDecay(initial=5, rate=2.0, period=10, floor=40),
        factor_decay=0.9,
        kl_clip=None,
    )
    cb.bind_steps_per_epoch(10)
    cb.inversions, cb.last_inversion_step = 3, 20
    state = _weights_only_round_trip(cb.state_dict())

    other = KFACCallback()  # built with the defaults: the checkpoint wins
    other.load_state_dict(state)
    steps = [0, 15, 20, 39, 40, 55, 100]
    assert [other.hyperparameters(s) for s in steps] == [cb.hyperparameters(s) for s in steps]
    assert other.hyperparameters(25)["damping"] == pytest.approx(0.0015)
    assert (other.inversions, other.last_inversion_step, other.steps_per_epoch) == (3, 20, 10)


def test_callables_are_not_checkpointed_and_the_current_one_is_kept():
    fn = lambda step: 0.5
    cb = KFACCallback(damping=fn)
    state = _weights_only_round_trip(cb.state_dict())
    other = KFACCallback(damping=lambda step: 0.25)
    other.load_state_dict(state)
    assert other.hyperparameters(0)["damping"] == 0.25


def test_the_adaptive_policy_round_trips_and_older_checkpoints_keep_their_measure():
    from lightning_kfac.engine.staleness import StalenessConfig

    policy = StalenessConfig(threshold=0.05, max_interval=80, max_factor_interval=4, damped=False, probe_after=3)
    state = _weights_only_round_trip(KFACCallback(adaptive=policy).state_dict())
    other = KFACCallback(adaptive=StalenessConfig())
    other.load_state_dict(state)
    assert other.adaptive == policy
    # written before the noise correction, the damped measure and probes existed: they measured
    # raw changes and never probed
    old = dict(state["adaptive"])
    del old["damped"], old["noise_corrected"], old["probe_after"]
    restored = KFACCallback(adaptive=StalenessConfig())
    restored.load_state_dict({**state, "adaptive": old})
    assert restored.adaptive == StalenessConfig(
        threshold=0.05, max_interval=80, max_factor_interval=4, damped=False, noise_corrected=False
    )
    # a key from a newer version is dropped with a warning, the rest is kept
    with pytest.warns(UserWarning, match="future_switch"):
        restored.load_state_dict({**state, "adaptive": {**state["adaptive"], "future_switch": 1}})
    assert restored.adaptive == policy


def test_first_format_checkpoints_still_load():
    cb = KFACCallback()
    cb.load_state_dict(
        {"damping": 0.02, "factor_update_freq": 2, "inv_update_freq": 5, "factor_decay": 0.9, "kl_clip": None}
    )
    assert cb.hyperparameters(0) == {
        "damping": 0.02,
        "factor_update_freq": 2,
        "inv_update_freq": 5,
        "factor_decay": 0.9,
        "kl_clip": None,
    }


# --- the two damping one-liners (README "Tuning and monitoring") --------------------------------
def test_the_documented_damping_one_liners():
    # KAISA examples: damping 0.003, halved at epochs 40 and 80
    kaisa = KFACCallback(damping=StepDecay(initial=0.003, milestones=[40, 80], gamma=0.5, unit="epoch"))
    kaisa.bind_steps_per_epoch(100)
    assert [kaisa.hyperparameters(s)["damping"] for s in (0, 3999, 4000, 8000)] == pytest.approx(
        [3e-3, 3e-3, 1.5e-3, 7.5e-4]
    )
    # Osawa et al.: damping starts large and decays exponentially, per epoch, to its target
    osawa = KFACCallback(damping=ExponentialDecay(initial=2.5e-2, rate=0.5, floor=2.5e-4, unit="epoch"))
    osawa.bind_steps_per_epoch(100)
    values = [osawa.hyperparameters(100 * e)["damping"] for e in (0, 1, 2, 10)]
    assert values == pytest.approx([2.5e-2, 1.25e-2, 6.25e-3, 2.5e-4])


# --- yaml (jsonargparse, as LightningCLI reads it) ------------------------------------------------
def test_schedules_and_adaptive_mode_come_from_yaml_without_code():
    jsonargparse = pytest.importorskip("jsonargparse")
    from lightning_kfac.engine.staleness import StalenessConfig

    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(KFACCallback, "kfac")
    config = parser.parse_string(
        """
kfac:
  damping:
    class_path: lightning_kfac.schedules.StepDecay
    init_args: {initial: 0.003, milestones: [40, 80], gamma: 0.5, unit: epoch}
  inv_update_freq:
    class_path: lightning_kfac.schedules.LinearWarmup
    init_args: {start: 5, end: 50, duration: 1000}
  factor_decay: 0.9
  kl_clip: null
  adaptive: {threshold: 0.1, max_interval: 400, damped: false, probe_after: 2}
"""
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = instantiate(config).kfac
    assert isinstance(cb, KFACCallback)
    assert cb.schedules["damping"] == StepDecay(initial=0.003, milestones=[40, 80], gamma=0.5, unit="epoch")
    assert cb.adaptive == StalenessConfig(threshold=0.1, max_interval=400, damped=False, probe_after=2)
    cb.bind_steps_per_epoch(10)
    assert cb.hyperparameters(500) == {
        "damping": pytest.approx(0.0015),
        "factor_update_freq": rules.DEFAULTS["factor_update_freq"],
        "inv_update_freq": 28,
        "factor_decay": 0.9,
        "kl_clip": None,
    }


def test_custom_schedule_subclass_works_in_the_callback():
    class Halving(Schedule):
        fields = ("start",)

        def __init__(self, start: float) -> None:
            self.start = start

        def value_at(self, t: float) -> float:
            return self.start / 2**t

        def extremes(self):
            return (self.start,)

    cb = KFACCallback(damping=Halving(1.0))
    assert cb.hyperparameters(3)["damping"] == 0.125
