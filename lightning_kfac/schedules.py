"""Hyperparameter schedules for :class:`~lightning_kfac.KFACCallback`.

Every K-FAC hyperparameter of the callback (``damping``, ``factor_update_freq``,
``inv_update_freq``, ``factor_decay``, ``kl_clip``) accepts

* a constant (``1e-3``),
* any callable of the optimizer step (``lambda step: 1e-2 if step < 500 else 1e-3``), or
* one of the named schedules below, which a yaml config expresses without code::

      damping:
        class_path: lightning_kfac.schedules.StepDecay
        init_args: {initial: 0.003, milestones: [40, 80], gamma: 0.5, unit: epoch}

Positions. A schedule is a function of ``t``: the optimizer step (``unit="step"``, the
default, counting from 0 like ``trainer.global_step``) or the epoch (``unit="epoch"``), where
``t = step / steps_per_epoch`` is fractional inside an epoch. The callback binds
``steps_per_epoch`` from the trainer (``ceil(num_training_batches / accumulate_grad_batches)``,
the optimizer steps of one epoch), so a milestone at epoch ``e`` takes effect at the first step
of epoch ``e``. When the epoch length is unknown (an iterable dataset without ``__len__``) the
integer epoch ``trainer.current_epoch`` is used instead. Outside Lightning, call
:meth:`Schedule.bind` yourself.

Integer hyperparameters (the two frequencies) are rounded to the nearest integer and held at
>= 1 by the callback, so ``ExponentialDecay(initial=100, rate=0.5)`` for ``inv_update_freq``
decays 100, 50, 25, 12, 6, 3, 2, 1, 1, ...

The schedules are plain data: :meth:`Schedule.state_dict` holds Python scalars and lists only
(checkpoints may be loaded with ``weights_only=True``), and :func:`schedule_from_state`
rebuilds a schedule from it without importing anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, ClassVar

from lightning_kfac.engine.validation import check_finite_float

__all__ = [
    "Constant",
    "Cosine",
    "ExponentialDecay",
    "LinearWarmup",
    "Schedule",
    "StepDecay",
    "as_schedule",
    "schedule_from_state",
]

UNITS = ("step", "epoch")


# --- argument checks (each names the argument, the value and what is allowed) ---------------
def _real(cls: str, name: str, value: Any) -> float:
    return check_finite_float(f"{cls}: {name}", value)


def _positive(cls: str, name: str, value: Any) -> float:
    value = _real(cls, name, value)
    if value <= 0.0:
        raise ValueError(f"{cls}: {name} must be > 0, got {value!r}")
    return value


def _unit(cls: str, value: Any) -> str:
    if value not in UNITS:
        raise ValueError(f"{cls}: unit must be one of {', '.join(repr(u) for u in UNITS)}; got {value!r}")
    return value


class Schedule:
    """A hyperparameter value as a function of the optimizer step.

    Subclasses implement :meth:`value_at` (of the position ``t`` in steps or epochs) and
    :meth:`extremes` (the values the schedule can reach, checked against the hyperparameter's
    allowed range when the callback is built); their constructor arguments are their state.
    """

    #: constructor arguments, in order; they are also the checkpointed state
    fields: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type[Schedule]]] = {}

    unit: str = "step"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Schedule._registry[cls.__name__] = cls

    # --- position --------------------------------------------------------------------------
    def bind(self, steps_per_epoch: int | None) -> Schedule:
        """Set how many optimizer steps an epoch has (for ``unit="epoch"``); returns self."""
        if steps_per_epoch is not None:
            if (
                isinstance(steps_per_epoch, bool)
                or not isinstance(steps_per_epoch, numbers.Integral)
                or steps_per_epoch < 1
            ):
                raise ValueError(f"steps_per_epoch must be an integer >= 1 or None, got {steps_per_epoch!r}")
            steps_per_epoch = int(steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        return self

    def position(self, step: int, epoch: float | None = None) -> float:
        """``t``: the step, or the (fractional) epoch of that step."""
        if self.unit == "step":
            return float(step)
        steps_per_epoch = getattr(self, "steps_per_epoch", None)
        if steps_per_epoch is not None:
            return step / steps_per_epoch
        if epoch is not None:
            return float(epoch)
        raise ValueError(
            f"{type(self).__name__}(unit='epoch') needs the number of optimizer steps per epoch: "
            "call .bind(steps_per_epoch=...) (the KFACCallback does this from the trainer)"
        )

    def __call__(self, step: int, epoch: float | None = None) -> float:
        return self.value_at(self.position(step, epoch))

    def value_at(self, t: float) -> float:
        raise NotImplementedError

    def extremes(self) -> tuple[float, ...]:
        """Values to validate up front: every value the schedule can take is between (or,
        for stepwise schedules, among) them."""
        raise NotImplementedError

    # --- state -----------------------------------------------------------------------------
    def init_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.fields:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "init_args": self.init_args(),
            "steps_per_epoch": getattr(self, "steps_per_epoch", None),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and type(other) is type(self) and other.init_args() == self.init_args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.init_args())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The same value at every step."""

    fields = ("value",)

    def __init__(self, value: float) -> None:
        self.value = _real("Constant", "value", value)
        self.unit = "step"

    def value_at(self, t: float) -> float:
        return self.value

    def extremes(self) -> tuple[float, ...]:
        return (self.value,)


class StepDecay(Schedule):
    """``initial * gamma ** k`` where ``k`` is the number of milestones reached.

    ``StepDecay(initial=0.003, milestones=[40, 80], gamma=0.5, unit="epoch")`` halves the value
    at the first step of epoch 40 and again at epoch 80 (the KAISA examples' damping decay).
    ``gamma > 1`` grows the value instead (e.g. rarer inversions later in training).
    """

    fields = ("initial", "milestones", "gamma", "unit")

    def __init__(self, initial: float, milestones: Sequence[float], gamma: float = 0.1, unit: str = "step") -> None:
        self.initial = _real("StepDecay", "initial", initial)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"StepDecay: milestones must be a list of steps or epochs, got {milestones!r}")
        values = [_real("StepDecay", "milestones", m) for m in milestones]
        if any(m < 0 for m in values) or any(b <= a for a, b in pairwise(values)):
            raise ValueError(f"StepDecay: milestones must be >= 0 and strictly increasing, got {list(milestones)!r}")
        self.milestones = tuple(int(m) if float(m).is_integer() else m for m in values)
        self.gamma = _positive("StepDecay", "gamma", gamma)
        self.unit = _unit("StepDecay", unit)

    def value_at(self, t: float) -> float:
        reached = sum(1 for m in self.milestones if t >= m)
        return self.initial * self.gamma**reached

    def extremes(self) -> tuple[float, ...]:
        return tuple(self.initial * self.gamma**k for k in range(len(self.milestones) + 1))


class ExponentialDecay(Schedule):
    """``initial * rate ** (t / period)``, held at ``floor`` (when given) from where it reaches it.

    ``rate < 1`` decays, ``rate > 1`` grows (then ``floor`` is a ceiling). ``staircase=True``
    changes the value only every whole ``period``.
    """

    fields = ("initial", "rate", "period", "floor", "staircase", "unit")

    def __init__(
        self,
        initial: float,
        rate: float,
        period: float = 1.0,
        floor: float | None = None,
        staircase: bool = False,
        unit: str = "step",
    ) -> None:
        self.initial = _real("ExponentialDecay", "initial", initial)
        self.rate = _positive("ExponentialDecay", "rate", rate)
        self.period = _positive("ExponentialDecay", "period", period)
        self.floor = None if floor is None else _real("ExponentialDecay", "floor", floor)
        if not isinstance(staircase, bool):
            raise TypeError(f"ExponentialDecay: staircase must be a bool, got {staircase!r}")
        self.staircase = staircase
        self.unit = _unit("ExponentialDecay", unit)

    def value_at(self, t: float) -> float:
        k = t / self.period
        if self.staircase:
            k = math.floor(k)
        value = self.initial * self.rate**k
        if self.floor is not None:
            value = max(value, self.floor) if self.rate <= 1.0 else min(value, self.floor)
        return value

    def extremes(self) -> tuple[float, ...]:
        return (self.initial,) if self.floor is None else (self.initial, self.floor)


class LinearWarmup(Schedule):
    """From ``start`` linearly to ``end`` over ``duration`` (after ``delay``), then ``end``.

    Either direction: a damping that starts large and settles (``start > end``) is a warm-up
    of the curvature information as much as an increasing value is.
    """

    fields = ("start", "end", "duration", "delay", "unit")

    def __init__(self, start: float, end: float, duration: float, delay: float = 0.0, unit: str = "step") -> None:
        self.start = _real("LinearWarmup", "start", start)
        self.end = _real("LinearWarmup", "end", end)
        self.duration = _positive("LinearWarmup", "duration", duration)
        self.delay = _real("LinearWarmup", "delay", delay)
        if self.delay < 0:
            raise ValueError(f"LinearWarmup: delay must be >= 0, got {delay!r}")
        self.unit = _unit("LinearWarmup", unit)

    def value_at(self, t: float) -> float:
        fraction = min(max((t - self.delay) / self.duration, 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    def extremes(self) -> tuple[float, ...]:
        return (self.start, self.end)


class Cosine(Schedule):
    """Half a cosine from ``start`` to ``end`` over ``duration``, then ``end``:
    ``end + (start - end) * (1 + cos(pi * t / duration)) / 2``."""

    fields = ("start", "end", "duration", "unit")

    def __init__(self, start: float, end: float, duration: float, unit: str = "step") -> None:
        self.start = _real("Cosine", "start", start)
        self.end = _real("Cosine", "end", end)
        self.duration = _positive("Cosine", "duration", duration)
        self.unit = _unit("Cosine", unit)

    def value_at(self, t: float) -> float:
        fraction = min(max(t / self.duration, 0.0), 1.0)
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * fraction)) / 2.0

    def extremes(self) -> tuple[float, ...]:
        return (self.start, self.end)


class _CallableSchedule(Schedule):
    """Wraps a user function of the step. Not registered: its state is not restorable."""

    fields = ()

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn
        self.unit = "step"

    def __call__(self, step: int, epoch: float | None = None) -> Any:
        return self.fn(step)

    def extremes(self) -> tuple[float, ...]:
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {
            "class": None,
            "init_args": {},
            "steps_per_epoch": None,
            "callable": getattr(self.fn, "__qualname__", repr(self.fn)),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CallableSchedule) and other.fn is self.fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __repr__(self) -> str:
        return f"<callable {getattr(self.fn, '__qualname__', self.fn)!s}>"


del Schedule._registry["_CallableSchedule"]


def as_schedule(name: str, value: Any) -> Schedule:
    """A :class:`Schedule` from a constant, a callable of the step, or a schedule."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Constant(float(value))
    if callable(value):
        return _CallableSchedule(value)
    raise TypeError(
        f"{name} must be a number, a callable of the optimizer step, or a schedule from "
        f"lightning_kfac.schedules ({', '.join(sorted(Schedule._registry))}); got {value!r} ({type(value).__name__})"
    )


def schedule_from_state(state: dict[str, Any]) -> Schedule | None:
    """Rebuild a schedule from :meth:`Schedule.state_dict`; ``None`` for a callable (code is
    not checkpointed) or a class this process does not know."""
    cls = Schedule._registry.get(state.get("class"))  # type: ignore[arg-type]
    if cls is None:
        return None
    schedule = cls(**state["init_args"])
    return schedule.bind(state.get("steps_per_epoch"))
