"""Which layers are due, step by step: fixed intervals, or adaptive ones (stale statistics).

:class:`FixedSchedule` follows the hyperparameters in force (``factor_update_freq``,
``inv_update_freq``). :class:`AdaptiveSchedule` keeps one
:class:`~lightning_kfac.engine.staleness.LayerStaleness` per layer: at each inversion the owner
measures how far the layer's factors moved since the previous one (against the damped factors,
net of sampling noise; ``engine/staleness.py``), picks the next intervals, and every rank
learns them from one small asynchronous all-reduce awaited at the next step.

The engine adds to what a schedule says: a trainable layer without factors records at every
step, and a layer never decomposed (or whose bias froze or thawed) is decomposed at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.engine import curvature
from lightning_kfac.engine.blocks.base import CurvatureBlock, Observer
from lightning_kfac.engine.hyperparameters import Hyperparameters
from lightning_kfac.engine.staleness import LayerStaleness, StalenessConfig, corrected_relative_change, relative_change

#: sends a (2, n) int64 tensor of next intervals and hold counts to every rank (element-wise
#: max), returning something to ``wait()`` on
Agree = Callable[[Tensor], Any]


class FixedSchedule:
    """Every layer on the global intervals, counted from its own last update: factors when
    ``step >= last factor update + factor_update_freq``, inversions likewise with
    ``inv_update_freq``, the intervals in force at that step. A scheduled interval (a warm-up of
    ``inv_update_freq``, say) thus spaces the updates as scheduled; counting multiples of the
    interval instead would leave gaps of up to twice it."""

    config: StalenessConfig | None = None

    def __init__(self, hyperparameters: Hyperparameters) -> None:
        self.hyperparameters = hyperparameters
        #: per-layer interval trackers (adaptive mode; empty here)
        self.trackers: dict[str, LayerStaleness] = {}
        #: per layer, the step of its last factor update and of its last inversion
        self.last_factor_update: dict[str, int] = {}
        self.last_inversion: dict[str, int] = {}

    def factors_due(self, name: str, step: int) -> bool:
        last = self.last_factor_update.get(name)
        return last is None or step >= last + self.hyperparameters.factor_update_freq

    def inversion_due(self, name: str, step: int) -> bool:
        last = self.last_inversion.get(name)
        return last is None or step >= last + self.hyperparameters.inv_update_freq

    def join(self, name: str, step: int) -> None:
        """A layer enters the schedule (registration, or its first factors)."""

    def after_factor_update(self, names: list[str], step: int) -> None:
        for name in names:
            self.last_factor_update[name] = step

    def observer(self, name: str, side: str) -> Observer | None:
        return None

    def before_inversion(
        self, names: list[str], step: int, blocks: dict[str, CurvatureBlock], owns: Callable[[str], bool], agree: Agree
    ) -> None:
        for name in names:
            self.last_inversion[name] = step

    def last_updates(self) -> dict[str, dict[str, int]]:
        """The per-layer last steps (checkpointed)."""
        return {"factors": dict(self.last_factor_update), "inversions": dict(self.last_inversion)}

    def load_last_updates(self, saved: dict[str, dict[str, int]] | None, step: int, names: list[str]) -> None:
        """Restore :meth:`last_updates`; a state written before they were kept continues as that
        code did (the next update at the next multiple of the interval)."""
        if saved is not None:
            self.last_factor_update = {n: int(s) for n, s in saved["factors"].items()}
            self.last_inversion = {n: int(s) for n, s in saved["inversions"].items()}
            return
        hyper = self.hyperparameters
        for interval, last in (
            (hyper.factor_update_freq, self.last_factor_update),
            (hyper.inv_update_freq, self.last_inversion),
        ):
            for name in names:
                last[name] = -(-step // interval) * interval - interval

    def sync(self) -> bool:
        """Apply decisions agreed since the last step; True when any changed."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class AdaptiveSchedule(FixedSchedule):
    """Per-layer intervals that grow while a layer's factors stay put (see the module docstring)."""

    def __init__(self, hyperparameters: Hyperparameters, config: StalenessConfig, inverse_dtype: torch.dtype) -> None:
        super().__init__(hyperparameters)
        self.config = config
        self.inverse_dtype = inverse_dtype
        self.next_factor_step: dict[str, int] = {}
        self.next_inverse_step: dict[str, int] = {}
        self._inverted_copies: dict[str, tuple[Tensor, Tensor]] = {}
        # owners: (sum of ||B_t - A_(t-1)||_F^2 and count of finite updates on the device, count
        # of all updates) per (layer, side) since the layer's last inversion: the noise estimate
        self.deviation: dict[tuple[str, str], tuple[Tensor, Tensor, int]] = {}
        self._pending: tuple[Any, list[str], int] | None = None

    def factors_due(self, name: str, step: int) -> bool:
        return step >= self.next_factor_step.get(name, 0)

    def inversion_due(self, name: str, step: int) -> bool:
        return step >= self.next_inverse_step.get(name, 0)

    def join(self, name: str, step: int) -> None:
        if name in self.trackers or self.config is None:
            return
        hyper = self.hyperparameters
        self.trackers[name] = LayerStaleness(self.config, hyper.inv_update_freq, hyper.factor_update_freq)
        self.next_factor_step[name] = step
        self.next_inverse_step[name] = step

    def after_factor_update(self, names: list[str], step: int) -> None:
        super().after_factor_update(names, step)
        for name in names:
            self.next_factor_step[name] = step + self.trackers[name].factor_interval

    def observer(self, name: str, side: str) -> Observer | None:
        """The noise statistics of a layer whose change this rank measures (the caller asks only
        for layers whose both factors it owns)."""
        if not self.config.noise_corrected:  # type: ignore[union-attr]
            return None

        def record(batch: Tensor, running: Tensor, finite: Tensor) -> None:
            deviation = torch.linalg.vector_norm(batch - running, dtype=torch.float64).square()
            deviation = torch.where(finite, deviation, torch.zeros_like(deviation))
            counted = finite.to(torch.float64)
            previous = self.deviation.get((name, side))
            if previous is None:
                self.deviation[(name, side)] = (deviation, counted, 1)
            else:
                total, finite_updates, updates = previous
                self.deviation[(name, side)] = (total.add_(deviation), finite_updates.add_(counted), updates + 1)

        return record

    def before_inversion(
        self, names: list[str], step: int, blocks: dict[str, CurvatureBlock], owns: Callable[[str], bool], agree: Agree
    ) -> None:
        """Owners measure each layer's change since its last inversion and pick the next
        intervals; every rank learns them at the next step."""
        super().before_inversion(names, step, blocks, owns, agree)
        # row 0: the next interval, row 1: the hold count (probe_after); owners write, others 0
        intervals = torch.zeros(2, len(names), dtype=torch.int64)
        for i, name in enumerate(names):
            if not owns(name):
                continue
            tracker, block = self.trackers[name], blocks[name]
            a, g = block.running_a, block.running_g
            previous = self._inverted_copies.get(name)
            if previous is not None and a is not None and g is not None:
                shifts = self._damping_shares(previous[0], previous[1])
                changes = [
                    self._change(name, side, new, old, shift)
                    for side, new, old, shift in (("a", a, previous[0], shifts[0]), ("g", g, previous[1], shifts[1]))
                ]
                tracker.observe(torch.stack(changes).max())
            if a is not None and g is not None:
                self._inverted_copies[name] = (a.clone(), g.clone())
            self.deviation.pop((name, "a"), None)
            self.deviation.pop((name, "g"), None)
            intervals[0, i] = tracker.inverse_interval
            intervals[1, i] = tracker.holds
        self._pending = (agree(intervals), list(names), step)

    def _damping_shares(self, a: Tensor, g: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """What the damping in force adds to A and to G (``pi sqrt(l)``, ``sqrt(l) / pi``) when
        the policy measures changes of the damped factors; zeros otherwise. pi comes from the
        diagonals in the inverse dtype, as the Cholesky inversion computes it."""
        if not self.config.damped:  # type: ignore[union-attr]
            return 0.0, 0.0
        diagonals = [(f if f.dim() == 1 else torch.diagonal(f)).to(self.inverse_dtype) for f in (a, g)]
        pi = curvature.tikhonov_pi(*diagonals).double()
        root = math.sqrt(self.hyperparameters.damping)
        return pi * root, root / pi

    def _change(self, name: str, side: str, new: Tensor, old: Tensor, shift: Tensor | float) -> Tensor:
        """Relative change of one running factor since the layer's last inversion, less what
        sampling noise explains when the policy asks for it."""
        recorded = self.deviation.get((name, side))
        if not self.config.noise_corrected or recorded is None:  # type: ignore[union-attr]
            return relative_change(new, old, shift)
        total, finite_updates, updates = recorded
        mean = torch.where(finite_updates > 0, total / finite_updates.clamp(min=1.0), torch.zeros_like(total))
        return corrected_relative_change(new, old, mean, self.hyperparameters.factor_decay, updates, shift)

    def sync(self) -> bool:
        if self._pending is None:
            return False
        pending, names, step = self._pending
        self._pending = None
        intervals = pending.wait()
        for name, interval, holds in zip(names, *intervals.tolist(), strict=True):
            tracker = self.trackers.get(name)
            if tracker is None:
                continue
            tracker.inverse_interval = int(interval)
            tracker.holds = int(holds)
            self.next_inverse_step[name] = step + int(interval)
            self.next_factor_step[name] = step + tracker.factor_interval
        return True

    def state_dict(self) -> dict[str, Any] | None:
        self.sync()
        return {
            name: {
                "tracker": tracker.state_dict(),
                "next_factor_step": self.next_factor_step.get(name, 0),
                "next_inverse_step": self.next_inverse_step.get(name, 0),
            }
            for name, tracker in self.trackers.items()
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Per-layer intervals come back; the factor copies used to measure the next change are
        not saved, so each layer's first inversion after a resume measures nothing."""
        for name, saved in (state or {}).items():
            tracker = self.trackers.get(name)
            if tracker is None:
                continue
            tracker.load_state_dict(saved["tracker"])
            self.next_factor_step[name] = int(saved["next_factor_step"])
            self.next_inverse_step[name] = int(saved["next_inverse_step"])


def make_schedule(
    adaptive: StalenessConfig | None, hyperparameters: Hyperparameters, inverse_dtype: torch.dtype, split_factors: bool
) -> FixedSchedule:
    """The schedule for ``adaptive`` (None: fixed intervals), checked against the structure."""
    if adaptive is None:
        return FixedSchedule(hyperparameters)
    if not isinstance(adaptive, StalenessConfig):
        raise TypeError(f"staleness must be a StalenessConfig or None, got {type(adaptive).__name__}")
    if split_factors:
        raise ValueError(
            "staleness (adaptive intervals) measures each layer's change on the rank holding both "
            "of its factors; it cannot be combined with split_factors=True (set split_factors=False)"
        )
    return AdaptiveSchedule(hyperparameters, adaptive, inverse_dtype)
