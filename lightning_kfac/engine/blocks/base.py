"""CurvatureBlock: one layer's Kronecker factors, their decomposition and its preconditioned
gradient. The contract every inverse method fulfils (``docs/design.md``, "Curvature blocks").

A public method does the shared work and calls a small per-method one:

=====================  ==========================================  ===========================
public                 shared work                                 per method
=====================  ==========================================  ===========================
:meth:`update`         first update replaces, then the running     (none)
                       average; non-finite batches dropped
:meth:`decompose`      which part of A (bias frozen?), fall-backs  :meth:`_decompose_sides`
                       (keep the last good one, NaN = plain grad)
:meth:`finish`         bias signature, counters, damping used      :meth:`_prepare`
:meth:`precondition`   dtypes, non-finite result -> plain grad     :meth:`_precondition`
:meth:`state_shape`    factors' shapes and dtypes                  :meth:`_decomposition_shape`
=====================  ==========================================  ===========================

A block knows nothing about ranks: the caller says which sides this rank decomposes and
whether it preconditions the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_kfac.engine import curvature
from lightning_kfac.engine.factors import FactorLayout
from lightning_kfac.engine.layers import KFACLayer

SIDES = ("a", "g")
#: sees a factor update before it is averaged in: (batch, running, finite flag)
Observer = Callable[[Tensor, Tensor, Tensor], None]


class CurvatureBlock:
    """Factors and decomposition of one layer (see the module docstring).

    Args:
        layer: the layer kind's view of the module (shapes, gradient as a matrix).
        factor_dtype: dtype of the running factors.
        inverse_dtype: dtype of the decomposition.
    """

    #: the decomposition tensors this method keeps (checkpointed, broadcast to gradient workers)
    decomposition_keys: ClassVar[tuple[str, ...]] = ()
    #: A and G may be decomposed on different ranks (``split_factors``)
    sides_apart: ClassVar[bool] = False

    def __init__(self, layer: KFACLayer, factor_dtype: torch.dtype, inverse_dtype: torch.dtype) -> None:
        self.layer = layer
        self.factor_dtype = factor_dtype
        self.inverse_dtype = inverse_dtype
        self.running_a: Tensor | None = None
        self.running_g: Tensor | None = None
        # the same on every rank: factor updates and inversions so far, the damping and the
        # bias signature of the decomposition in force
        self.a_updates = 0
        self.g_updates = 0
        self.inversions = 0
        self.decomposed_with_bias: bool | None = None
        self.damping: float | None = None
        self._nonfinite: Tensor | None = None  # dropped updates, counted on the device
        for key in self.decomposition_keys:
            setattr(self, key, None)

    # --- factors -----------------------------------------------------------------------------
    def layout(self, side: str) -> FactorLayout:
        return self.layer.a_layout if side == "a" else self.layer.g_layout

    def running(self, side: str) -> Tensor | None:
        return self.running_a if side == "a" else self.running_g

    @property
    def has_factors(self) -> bool:
        return self.a_updates > 0 and self.g_updates > 0

    def update(
        self, side: str, batch: Tensor, scale: float | Tensor, decay: float, observe: Observer | None = None
    ) -> bool:
        """Running average of ``scale * batch`` (``batch`` is the caller's scratch, scaled in
        place, then cast to the factor dtype). A non-finite batch leaves the running factor as
        it was, decided on the device. ``observe(batch, running, finite)`` sees the update
        before it is averaged in (the stale-statistics noise estimate). Returns False when a
        first update was dropped (the one case decided on the host)."""
        if isinstance(scale, Tensor) or scale != 1.0:
            batch.mul_(scale)
        batch = batch.to(self.factor_dtype)
        finite = curvature.all_finite(batch)
        running = self.running(side)
        if running is None:
            if not bool(finite):
                return False
            setattr(self, f"running_{side}", batch.clone())  # not a view into a bucket's buffer
            return True
        if observe is not None:
            observe(batch, running, finite)
        curvature.running_average_(running, batch, decay, finite)
        skipped = (~finite).to(torch.int64)
        self._nonfinite = skipped if self._nonfinite is None else self._nonfinite.add_(skipped)
        return True

    def take_nonfinite_count(self) -> int:
        """Updates dropped since the last call (one host read; called at inversions)."""
        count, self._nonfinite = self._nonfinite, None
        return 0 if count is None else int(count)

    def reset_factors(self) -> None:
        self.running_a = self.running_g = None
        self.a_updates = self.g_updates = 0
        self.clear_decomposition()

    # --- decomposition -------------------------------------------------------------------------
    @property
    def reshaped(self) -> bool:
        """The bias froze or thawed since the decomposition in force was made."""
        return self.decomposed_with_bias is not None and self.decomposed_with_bias != self.layer.bias_trains

    def active_factor(self, side: str) -> Tensor | None:
        """The factor as decomposed: A without its bias column while the bias is frozen."""
        factor = self.running(side)
        return self.layer.active_a(factor) if side == "a" and factor is not None else factor

    def active_layout(self, side: str) -> FactorLayout:
        return self.layer.active_a_layout if side == "a" else self.layer.g_layout

    def decompose(self, sides: tuple[str, ...], damping: float) -> int:
        """Decompose the given sides (the ones this rank owns). A decomposition that fails even
        in float64 keeps the last good one; a layer that never had one, or whose bias froze or
        thawed since, gets NaNs, which precondition to the plain gradient. Returns the number of
        failures."""
        if not sides:
            return 0
        return self._decompose_sides(sides, damping)

    def _decompose_sides(self, sides: tuple[str, ...], damping: float) -> int:
        raise NotImplementedError

    def finish(self, damping: float, preconditions_here: bool) -> None:
        """After the decomposition reached every gradient worker: the same on every rank."""
        self.decomposed_with_bias = self.layer.bias_trains
        self.inversions += 1
        self.damping = damping
        if preconditions_here:
            self._prepare(damping)

    def _prepare(self, damping: float) -> None:
        """Per-method work a gradient worker does once per inversion (e.g. a denominator)."""

    def restore(self, preconditions_here: bool) -> None:
        """After :meth:`load`: what a gradient worker derives from the decomposition."""
        if preconditions_here and self.inversions and self.damping is not None and self.decomposition_complete:
            self._prepare(self.damping)

    @property
    def decomposition_complete(self) -> bool:
        keys = [k for k in self.decomposition_keys if not (k == "q_a" and self.layer.a_diagonal)]
        return all(getattr(self, k) is not None for k in keys)

    @classmethod
    def decomposition_numel(cls, a: FactorLayout, g: FactorLayout) -> int:
        """Values a gradient worker keeps for one layer with these (active) factor layouts."""
        raise NotImplementedError

    def clear_decomposition(self) -> None:
        for key in self.decomposition_keys:
            setattr(self, key, None)
        self.inversions = 0
        self.decomposed_with_bias = None
        self.damping = None

    @property
    def ready(self) -> bool:
        """Preconditioned now: decomposed, training, and for the parameters that train."""
        return self.inversions > 0 and self.layer.trains and (not self.layer.has_bias or not self.reshaped)

    def decomposition_entries(self, sides: tuple[str, ...]) -> list[tuple[str, tuple[int, ...], bool]]:
        """(key, wire shape, packed symmetric) of what decomposing ``sides`` produced."""
        raise NotImplementedError

    # --- preconditioning -----------------------------------------------------------------------
    def precondition(self, grad: Tensor) -> Tensor:
        """V' for the layer gradient ``grad`` (g_dim x active a_dim), in ``grad``'s dtype. A
        failed decomposition (non-finite) or a result that overflows that dtype gives ``grad``
        back; the inner product <V', V> is non-finite exactly then, in one pass."""
        out = self._precondition(grad.to(self.inverse_dtype))
        if out.dtype != grad.dtype:
            out = out.to(grad.dtype)
        # in place: `out` is a fresh result of the method's products, never a view of `grad`
        return torch.where(torch.isfinite(curvature.inner(out, grad)), out, grad, out=out)

    def _precondition(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    # --- state ---------------------------------------------------------------------------------
    def state_keys(self) -> list[str]:
        keys = [f"running_{side}" for side in SIDES if getattr(self, f"{side}_updates")]
        if self.inversions:
            keys += [k for k in self.decomposition_keys if not (k == "q_a" and self.layer.a_diagonal)]
        return keys

    def state_shape(self, key: str, with_bias: bool | None = None) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a state tensor; decompositions for the bias signature
        ``with_bias`` (default: the one in force)."""
        if key.startswith("running"):
            return self.layout(key[-1]).shape, self.factor_dtype
        if with_bias is None:
            with_bias = self.decomposed_with_bias
        a_dim = self.layer.a_dim - int(self.layer.has_bias and with_bias is False)
        return self._decomposition_shape(key, a_dim), self.inverse_dtype

    def allowed_shapes(self, key: str) -> list[tuple[int, ...]]:
        """Shapes a saved tensor may have for this layer (decompositions: either bias signature)."""
        if key.startswith("running"):
            return [self.state_shape(key)[0]]
        signatures = (True, False) if self.layer.has_bias else (None,)
        return [self.state_shape(key, s)[0] for s in signatures]

    def _decomposition_shape(self, key: str, a_dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {
            "a_updates": self.a_updates,
            "g_updates": self.g_updates,
            "inversions": self.inversions,
            "decomposed_with_bias": self.decomposed_with_bias,
        }

    def load(self, saved: dict[str, Tensor], meta: dict[str, Any], keep: Any) -> None:
        """Put a saved layer state in force; ``keep(key)`` says whether this rank holds ``key``."""
        self.reset_factors()
        self.a_updates, self.g_updates = int(meta["a_updates"]), int(meta["g_updates"])
        self.inversions = int(meta["inversions"])
        self.decomposed_with_bias = meta["decomposed_with_bias"]
        self.damping = meta.get("damping")
        device = self.layer.weight.device
        for key, value in saved.items():
            if not keep(key):
                continue
            tensor = value.to(device=device, dtype=self.state_shape(key)[1]).clone()
            if key.startswith("running") and not bool(curvature.all_finite(tensor)):
                continue  # its owner never had a finite update
            setattr(self, key, tensor)

    def held_tensors(self) -> dict[str, Tensor]:
        """Factor and decomposition tensors this rank holds (for memory accounting)."""
        keys = ("running_a", "running_g", *self.decomposition_keys, *self.derived_keys)
        return {k: getattr(self, k) for k in keys if getattr(self, k, None) is not None}

    #: tensors computed from the decomposition on a gradient worker (not checkpointed)
    derived_keys: ClassVar[tuple[str, ...]] = ()


def nan_like_layout(layout: FactorLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full(layout.shape, float("nan"), dtype=dtype, device=device)
