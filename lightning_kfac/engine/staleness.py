"""Stale statistics: per-layer adaptive factor-update and inversion intervals (pure logic).

Kronecker factors change quickly early in training and slowly later (Osawa et al., SP-NGD).
In the adaptive mode every layer carries a :class:`LayerStaleness`. Each time the layer is
inverted, its owner measures how far the running factors moved since the previous inversion,

    change = max( ||A_new - A_old||_F / ||A_old||_F ,  ||G_new - G_old||_F / ||G_old||_F )

(:func:`relative_change` for one factor; by default measured against the damped factors and
net of sampling noise, :func:`corrected_relative_change`, both explained below), and
:meth:`LayerStaleness.observe` turns it into the next inversion interval:

* ``change <  threshold``         the factors are stale-safe: the interval grows (x ``growth``),
* ``change >  shrink_threshold``  they move again: the interval shrinks (x ``shrink``),
* in between                      the interval holds,

always within ``[min_interval, max_interval]``. ``shrink_threshold`` defaults to
``growth * threshold``: a layer whose factors drift at a steady rate (change proportional to
the interval) then settles on one interval instead of oscillating between two.

Drift or fluctuation. A change in the hold band may be drift (the factors walk away; the change
grows with the interval) or fluctuation about a level (it does not; a fresher inverse would be
no closer to the level the factors move about). With ``probe_after = k`` the ``k``-th
measurement in a row in the band grows the interval instead of holding it (``k - 1`` holds,
then a probe): fluctuation stays in the band and the interval keeps growing every ``k``
inversions, while drift crosses ``shrink_threshold`` at the longer interval and shrinks it back.

The factor-update interval follows the inversion interval at the ratio the run started with
(``inv_update_freq / factor_update_freq``, 10 with the defaults), so every inversion still sees
the same number of factor updates in its running average:
``factor_interval = max(1, inverse_interval // ratio)``, at most ``max_factor_interval`` when
that is set (long inversion intervals over a running average that stays fresh).

Sampling noise. The running factors are exponential averages of per-batch estimates, and a
batch estimate of a wide factor from few rows is noisy (relative Frobenius error about
sqrt(effective rank / rows)). Two running averages taken T updates apart then differ by noise
alone, even when the true factors stand still, and that noise does not shrink as the interval
grows: with the raw change, a wide layer would never be allowed to go stale. With
``noise_corrected`` (the default) the owner also accumulates, at every factor update, the
squared deviation of the batch factor from the running one, m = mean ||B_t - A_{t-1}||_F^2, and
subtracts the change that noise alone explains before taking the ratio
(:func:`corrected_relative_change`):

    noise^2 = (1 - decay) (1 - decay^T) m            (T: factor updates between the inversions)
    change  = sqrt(max(0, ||A_new - A_old||_F^2 - noise^2)) / ||A_old||_F

With ``damped`` the denominator is the damped factor's norm, ``||A_old + delta I||_F``
(:func:`shifted_norm`): a change matters only relative to what the preconditioner inverts.

For i.i.d. batch estimates B_t = S + E_t around a fixed S (s^2 = E||E_t||^2, stationary average),
E||A_t - A_(t-T)||^2 = 2 s^2 (1 - decay)(1 - decay^T) / (1 + decay) and E[m] = 2 s^2 / (1 + decay),
so the first is (1 - decay)(1 - decay^T) E[m] (:func:`noise_floor_sq`); a drift of S adds to
||A_new - A_old||^2 and shows through. A layer's change is the larger of its two factors'.

Everything here is deterministic given the sequence of measured changes, so ranks that learn
the owner's decision (an int) or its measurement (a float) agree without further talk.
No torch.distributed, no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.engine.validation import check_finite_float, check_positive_int

__all__ = [
    "LayerStaleness",
    "StalenessConfig",
    "corrected_relative_change",
    "noise_floor_sq",
    "relative_change",
    "shifted_norm",
]


def _check_real(name: str, value: Any) -> float:
    return check_finite_float(f"StalenessConfig: {name}", value)


def _check_int(name: str, value: Any) -> int:
    return check_positive_int(f"StalenessConfig: {name}", value)


@dataclass(frozen=True)
class StalenessConfig:
    """Validated settings of the adaptive (stale statistics) mode.

    Args:
        threshold: relative Frobenius change of a layer's factors between two inversions below
            which its intervals grow (> 0). 0.1 with ``probe_after=2`` made 48% fewer inversions
            than a fixed interval of 50, at 0.33 points more accuracy, and 90% fewer than fixed 10
            at its accuracy, on the Fashion-MNIST CNN over 5 cosine epochs
            (``benchmarks/staleness.py``, README "Stale statistics").
        min_interval: shortest inversion interval, in optimizer steps (>= 1).
        max_interval: longest inversion interval (>= min_interval).
        growth: factor the interval is multiplied by while the factors are stable (> 1).
        shrink: factor it is multiplied by when they change again, in [0, 1); 0 returns to
            ``min_interval`` at once.
        shrink_threshold: change above which the interval shrinks (>= threshold); ``None``:
            ``growth * threshold``.
        noise_corrected: subtract the change that batch-to-batch sampling noise of the running
            averages explains (see the module docstring); ``False`` compares raw changes.
        max_factor_interval: longest factor-update interval (>= 1); ``None``: the factor
            interval follows the inversion interval at the starting ratio without a cap.
        probe_after: the ``probe_after``-th consecutive measurement in the hold band
            ``[threshold, shrink_threshold]`` grows the interval instead of holding it (>= 1; 1:
            every change in the band grows; see "Drift or fluctuation" above);
            ``None`` (the default, as before probes existed): a layer in the band holds its
            interval for as long as it stays there. 2 is the measured recommendation.
        damped: measure each factor's change against the damped factor the preconditioner
            inverts, ``||F_new - F_old||_F / ||F_old + delta I||_F`` with ``delta`` the factor's
            share of the damping (``pi sqrt(damping)`` for A, ``sqrt(damping) / pi`` for G, as in
            the Cholesky method; the eigen method damps the Kronecker product, for which this split
            is the usual factored stand-in). Where damping dwarfs most eigenvalues the
            preconditioner hardly depends on the factors, and their changes then matter little.
    """

    threshold: float = 0.1
    min_interval: int = 1
    max_interval: int = 200
    growth: float = 2.0
    shrink: float = 0.5
    shrink_threshold: float | None = None
    noise_corrected: bool = True
    max_factor_interval: int | None = None
    damped: bool = True
    probe_after: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        threshold = _check_real("threshold", self.threshold)
        if threshold <= 0:
            raise ValueError(f"StalenessConfig: threshold must be > 0, got {self.threshold!r}")
        set_(self, "threshold", threshold)
        set_(self, "min_interval", _check_int("min_interval", self.min_interval))
        set_(self, "max_interval", _check_int("max_interval", self.max_interval))
        if self.max_interval < self.min_interval:
            raise ValueError(
                f"StalenessConfig: max_interval must be >= min_interval={self.min_interval}, got {self.max_interval!r}"
            )
        growth = _check_real("growth", self.growth)
        if growth <= 1.0:
            raise ValueError(f"StalenessConfig: growth must be > 1, got {self.growth!r}")
        set_(self, "growth", growth)
        shrink = _check_real("shrink", self.shrink)
        if not 0.0 <= shrink < 1.0:
            raise ValueError(f"StalenessConfig: shrink must be in [0, 1), got {self.shrink!r}")
        set_(self, "shrink", shrink)
        if self.shrink_threshold is not None:
            upper = _check_real("shrink_threshold", self.shrink_threshold)
            if upper < threshold:
                raise ValueError(
                    f"StalenessConfig: shrink_threshold must be >= threshold={threshold}, got {self.shrink_threshold!r}"
                )
            set_(self, "shrink_threshold", upper)
        if self.max_factor_interval is not None:
            set_(self, "max_factor_interval", _check_int("max_factor_interval", self.max_factor_interval))
        if self.probe_after is not None:
            set_(self, "probe_after", _check_int("probe_after", self.probe_after))
        for flag in ("noise_corrected", "damped"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise TypeError(
                    f"StalenessConfig: {flag} must be True or False, got {value!r} ({type(value).__name__})"
                )

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> tuple[StalenessConfig, list[str]]:
        """The settings a checkpoint recorded, and the names in it this version does not know.
        A switch added after the checkpoint was written is set to what the run was measured
        without."""
        known = {f.name for f in fields(cls)}
        added_later = {"noise_corrected": False, "damped": False, "probe_after": None}
        config = cls(**{**added_later, **{k: v for k, v in saved.items() if k in known}})
        return config, sorted(set(saved) - known)

    @property
    def upper_threshold(self) -> float:
        """The change above which intervals shrink."""
        return self.shrink_threshold if self.shrink_threshold is not None else self.growth * self.threshold

    def clamp(self, interval: int) -> int:
        return min(self.max_interval, max(self.min_interval, int(interval)))

    def grow(self, interval: int) -> int:
        """The interval after one growth (at least one step longer), within the bounds."""
        return self.clamp(max(interval + 1, math.ceil(interval * self.growth)))

    def in_hold_band(self, change: float) -> bool:
        return math.isfinite(change) and self.threshold <= change <= self.upper_threshold

    def next_interval(self, interval: int, change: float) -> int:
        """The interval after one measured ``change`` (NaN or inf count as a change), before
        any probe (:meth:`LayerStaleness.observe` adds those)."""
        if not math.isfinite(change) or change > self.upper_threshold:
            return self.clamp(math.floor(interval * self.shrink))
        if change < self.threshold:
            return self.grow(interval)
        return self.clamp(interval)

    def state_dict(self) -> dict[str, Any]:
        """Python scalars only."""
        return asdict(self)


def relative_change(new: Tensor, old: Tensor, shift: Tensor | float = 0.0) -> Tensor:
    """``||new - old||_F / ||old + shift I||_F`` as a 0-dim float64 tensor on the factors' device
    (no host sync: stack several and read them with one ``.tolist()``). ``old`` and ``new`` are
    square matrices or, for a diagonal factor, vectors. ``shift`` is the damping the
    preconditioner adds to ``old`` (0: the plain relative change). A zero denominator gives 0
    when ``new == old`` and ``inf`` otherwise."""
    return _change_ratio("relative_change", new, old, None, shift)


def shifted_norm(factor: Tensor, shift: Tensor | float) -> Tensor:
    """``||factor + shift I||_F`` without forming the sum: ``sqrt(||F||^2 + 2 shift tr F + shift^2 n)``
    (``factor`` a square matrix, or a vector standing for a diagonal one); float64."""
    factor = factor.detach().double()
    norm = torch.linalg.vector_norm(factor)
    if isinstance(shift, (int, float)) and shift == 0:
        return norm
    diagonal = factor if factor.dim() == 1 else torch.diagonal(factor)
    shift64 = torch.as_tensor(shift, dtype=torch.float64, device=factor.device)
    # in units of the larger term, so that a huge shift (a factor near zero) cannot overflow
    scale = torch.maximum(norm, shift64.abs() * math.sqrt(diagonal.numel())).clamp(min=torch.finfo(torch.float64).tiny)
    s = shift64 / scale
    square = (norm / scale).square() + 2.0 * s * (diagonal.sum() / scale) + s.square() * diagonal.numel()
    return scale * square.clamp(min=0.0).sqrt()


def _ratio(change: Tensor, base: Tensor) -> Tensor:
    """change / base, with 0 / 0 = 0 and x / 0 = inf for x > 0."""
    return torch.where(
        base > 0, change / base, torch.where(change > 0, torch.full_like(change, math.inf), torch.zeros_like(change))
    )


def noise_floor_sq(deviation_sq_mean: Tensor | float, decay: float, updates: int) -> Tensor | float:
    """Expected ``||A_t - A_(t-T)||_F^2`` of a running average that only sampling noise moves,
    ``(1 - decay) (1 - decay^T) m``, from ``m`` = the mean of ``||B_t - A_(t-1)||_F^2`` over the
    ``T = updates`` factor updates between the two running values."""
    if updates < 1:
        return deviation_sq_mean * 0.0
    return deviation_sq_mean * ((1.0 - decay) * (1.0 - decay**updates))


def corrected_relative_change(
    new: Tensor, old: Tensor, deviation_sq_mean: Tensor | float, decay: float, updates: int, shift: Tensor | float = 0.0
) -> Tensor:
    """``sqrt(max(0, ||new - old||_F^2 - noise^2)) / ||old + shift I||_F`` (float64, no host
    sync), with ``noise^2`` from :func:`noise_floor_sq`; the same conventions as
    :func:`relative_change`."""
    noise_sq = torch.as_tensor(
        noise_floor_sq(deviation_sq_mean, decay, updates), dtype=torch.float64, device=new.device
    )
    return _change_ratio("corrected_relative_change", new, old, noise_sq, shift)


def _change_ratio(caller: str, new: Tensor, old: Tensor, noise_sq: Tensor | None, shift: Tensor | float) -> Tensor:
    """``||new - old||_F`` (less ``noise_sq`` in quadrature when given) over ``||old + shift I||_F``."""
    if new.shape != old.shape:
        raise ValueError(f"{caller} needs tensors of one shape, got {tuple(new.shape)} and {tuple(old.shape)}")
    new64, old64 = new.detach().double(), old.detach().double()
    change = torch.linalg.vector_norm(new64 - old64)
    if noise_sq is not None:
        change = (change.square() - noise_sq).clamp(min=0.0).sqrt()
    return _ratio(change, shifted_norm(old64, shift))


class LayerStaleness:
    """The adaptive intervals of one layer.

    Args:
        config: the policy.
        inverse_interval: the starting inversion interval (the run's ``inv_update_freq``),
            clamped to the config's bounds.
        factor_interval: the run's ``factor_update_freq``; ``inverse_interval // factor_interval``
            (at least 1) is the ratio the factor interval keeps to the inversion interval.
    """

    def __init__(self, config: StalenessConfig, inverse_interval: int = 10, factor_interval: int = 1) -> None:
        if not isinstance(config, StalenessConfig):
            raise TypeError(f"config must be a StalenessConfig, got {type(config).__name__}")
        inverse_interval = check_positive_int("inverse_interval", inverse_interval)
        factor_interval = check_positive_int("factor_interval", factor_interval)
        self.config = config
        self.ratio = max(1, inverse_interval // factor_interval)
        self.inverse_interval = config.clamp(inverse_interval)
        self.last_change: float | None = None
        self.observations = 0
        self.grown = 0
        self.shrunk = 0
        # consecutive measurements in the hold band (for probe_after); shared with every rank
        # with the interval, so that any rank can take over the layer's decisions after a resume
        self.holds = 0

    @property
    def factor_interval(self) -> int:
        """Steps between factor updates of this layer."""
        interval = max(1, self.inverse_interval // self.ratio)
        cap = self.config.max_factor_interval
        return interval if cap is None else min(interval, cap)

    def observe(self, change: float | Tensor) -> int:
        """Record the relative change measured at an inversion; return the next inversion
        interval (also :attr:`inverse_interval`; :attr:`factor_interval` follows)."""
        value = float(change)
        before = self.inverse_interval
        config = self.config
        after = config.next_interval(before, value)
        if config.probe_after is not None and config.in_hold_band(value):  # in the band: a hold
            self.holds += 1
            if self.holds >= config.probe_after:
                after = config.grow(before)
                self.holds = 0
        else:
            self.holds = 0
        self.inverse_interval = after
        self.last_change = value
        self.observations += 1
        self.grown += int(self.inverse_interval > before)
        self.shrunk += int(self.inverse_interval < before)
        return self.inverse_interval

    def state_dict(self) -> dict[str, Any]:
        """Python scalars only (the config is the caller's)."""
        return {
            "inverse_interval": self.inverse_interval,
            "ratio": self.ratio,
            "last_change": self.last_change,
            "observations": self.observations,
            "grown": self.grown,
            "shrunk": self.shrunk,
            "holds": self.holds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio = max(1, int(state["ratio"]))
        self.inverse_interval = self.config.clamp(int(state["inverse_interval"]))
        last = state.get("last_change")
        self.last_change = None if last is None else float(last)
        self.observations = int(state.get("observations", 0))
        self.grown = int(state.get("grown", 0))
        self.shrunk = int(state.get("shrunk", 0))
        self.holds = int(state.get("holds", 0))

    def __repr__(self) -> str:
        return (
            f"LayerStaleness(inverse_interval={self.inverse_interval}, factor_interval={self.factor_interval}, "
            f"last_change={self.last_change})"
        )
