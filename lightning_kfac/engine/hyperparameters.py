"""The K-FAC hyperparameters that may change from step to step, one rule each.

``damping``, ``factor_update_freq``, ``inv_update_freq``, ``factor_decay`` and ``kl_clip`` are
set on the engine (by the user, or by :class:`~lightning_kfac.KFACCallback` from a schedule
before every step) and carried in its checkpoints. Structural choices (inverse method, dtypes,
distribution) are not here: they are fixed at construction in
:class:`~lightning_kfac.engine.config.KFACConfig`.

Two entry points apply the rules:

* :func:`check`: a value given as a constant (a constructor argument, a yaml number): strict,
  an interval must be an integer;
* :func:`coerce`: a value a schedule produced: intervals are rounded to integers >= 1.

Every error names the hyperparameter, the value and what is allowed (``engine/validation.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_kfac.engine.validation import (
    check_decay,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
)


@dataclass(frozen=True)
class Rule:
    """What one hyperparameter may be."""

    check: Callable[[str, Any], Any]
    integer: bool = False
    optional: bool = False
    doc: str = ""


RULES: dict[str, Rule] = {
    "damping": Rule(check_positive_float, doc="Tikhonov damping lambda > 0, applied at each inversion"),
    "factor_update_freq": Rule(check_positive_int, integer=True, doc="optimizer steps between factor updates"),
    "inv_update_freq": Rule(check_positive_int, integer=True, doc="optimizer steps between inversions"),
    "factor_decay": Rule(check_decay, doc="running-average decay in [0, 1)"),
    "kl_clip": Rule(check_optional_positive_float, optional=True, doc="KL-clip bound > 0, or None (off)"),
}
NAMES: tuple[str, ...] = tuple(RULES)
#: chosen for large-batch training by the batch-scaling benchmark (README "Results" and "When
#: K-FAC helps"): damping 0.03 (0.1 needed 1.3-1.5x the steps at batches 2048-16384), KL clip 0.1
#: (without a clip the tuned learning rates missed the target), factors every 2 steps, inversions
#: every 10 (within about 15% of the steps of inverting every 2 on the MLP; inversions of wide
#: layers cost more). Small batches want damping 0.1 and a clip of 0.01.
DEFAULTS: dict[str, Any] = {
    "damping": 0.03,
    "factor_update_freq": 2,
    "inv_update_freq": 10,
    "factor_decay": 0.95,
    "kl_clip": 0.1,
}


def _rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown K-FAC hyperparameter {name!r}; known: {', '.join(NAMES)}") from None


def check(name: str, value: Any) -> Any:
    """``value`` as a constant setting of hyperparameter ``name`` (strict types)."""
    return _rule(name).check(name, value)


def coerce(name: str, raw: Any) -> Any:
    """A scheduled value as the engine takes it: intervals rounded to integers >= 1, the rest
    checked against their range (``None`` only where the hyperparameter allows it)."""
    rule = _rule(name)
    if raw is None and rule.optional:
        return None
    if not rule.integer:
        return rule.check(name, raw)
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        raise TypeError(
            f"{name} must be a number (it is rounded to an integer >= 1), got {raw!r} ({type(raw).__name__})"
        )
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    return max(1, math.floor(value + 0.5))


class Hyperparameters:
    """The values in force, each validated by its rule when assigned; a checkpoint carries
    :meth:`as_dict` (Python scalars only)."""

    __slots__ = NAMES
    damping: float
    factor_update_freq: int
    inv_update_freq: int
    factor_decay: float
    kl_clip: float | None

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(NAMES))
        if unknown:
            raise TypeError(f"unknown K-FAC hyperparameters {unknown}; known: {', '.join(NAMES)}")
        for name in NAMES:
            setattr(self, name, values.get(name, DEFAULTS[name]))

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, check(name, value))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in NAMES}

    def load(self, values: dict[str, Any]) -> None:
        for name in NAMES:
            if name in values:
                setattr(self, name, values[name])

    def __repr__(self) -> str:
        return "Hyperparameters(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"
