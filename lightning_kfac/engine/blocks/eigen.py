"""The eigen method: each factor is eigendecomposed on its owner, F = Q diag(d) Q^T, and the
preconditioned gradient is V' = Q_G [(Q_G^T V Q_A) / D] Q_A^T with a denominator D fixed once per
inversion (``docs/conventions.md``). A diagonal factor is its own eigendecomposition (Q = I).
The two factors are decomposed independently, so they may live on different ranks
(``split_factors``). Two dampings, one class each (they differ only in D):

* :class:`FactoredEigenBlock`: Tikhonov damping per factor, D = (d_G + gamma_G)(d_A + gamma_A)^T
  with gamma_A = pi sqrt(lambda), gamma_G = sqrt(lambda) / pi;
* :class:`EigenBlock`: exact damping of the Kronecker product, D = d_G d_A^T + lambda.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lightning_kfac.engine import curvature
from lightning_kfac.engine.blocks.base import CurvatureBlock
from lightning_kfac.engine.factors import FactorLayout


class EigenBlock(CurvatureBlock):
    """Eigendecomposed factors, exact damping of the Kronecker product."""

    decomposition_keys: ClassVar[tuple[str, ...]] = ("q_a", "d_a", "q_g", "d_g")
    derived_keys: ClassVar[tuple[str, ...]] = ("inv_denominator",)
    sides_apart: ClassVar[bool] = True

    q_a: Tensor | None
    d_a: Tensor | None
    q_g: Tensor | None
    d_g: Tensor | None
    inv_denominator: Tensor | None = None

    def _decompose_sides(self, sides: tuple[str, ...], damping: float) -> int:
        failures = 0
        for side in sides:
            factor = self.active_factor(side)
            result = safe_eigh(factor, self.inverse_dtype)
            if result is None:
                failures += factor is not None
                previous = (getattr(self, f"q_{side}"), getattr(self, f"d_{side}"))
                if previous[1] is not None and not self.reshaped:
                    continue
                layout = self.active_layout(side)
                nan = torch.full((layout.dim,), float("nan"), dtype=self.inverse_dtype, device=self.layer.weight.device)
                result = (None if layout.diagonal else torch.diag(nan)), nan
            setattr(self, f"q_{side}", result[0])
            setattr(self, f"d_{side}", result[1])
        return failures

    def _prepare(self, damping: float) -> None:
        assert self.d_a is not None and self.d_g is not None
        self.inv_denominator = self.denominator(self.d_a, self.d_g, damping)

    def denominator(self, d_a: Tensor, d_g: Tensor, damping: float) -> Tensor:
        """1 / D, precomputed once per inversion and used every step."""
        return curvature.eigen_inverse_denominator(d_g, d_a, damping)

    def _precondition(self, v: Tensor) -> Tensor:
        assert self.q_g is not None and self.inv_denominator is not None
        return curvature.eigen_precondition(v, self.q_a, self.q_g, self.inv_denominator)

    def clear_decomposition(self) -> None:
        super().clear_decomposition()
        self.inv_denominator = None

    def decomposition_entries(self, sides: tuple[str, ...]) -> list[tuple[str, tuple[int, ...], bool]]:
        entries: list[tuple[str, tuple[int, ...], bool]] = []
        for side in sides:
            n = self.active_layout(side).dim
            if not (side == "a" and self.layer.a_diagonal):
                entries.append((f"q_{side}", (n, n), False))
            entries.append((f"d_{side}", (n,), False))
        return entries

    def _decomposition_shape(self, key: str, a_dim: int) -> tuple[int, ...]:
        n = a_dim if key.endswith("_a") else self.layer.g_dim
        return (n,) if key.startswith("d_") else (n, n)

    @classmethod
    def decomposition_numel(cls, a: FactorLayout, g: FactorLayout) -> int:
        """Eigenbases (none for a diagonal factor), eigenvalues and the denominator."""
        return a.eigen_numel() + g.eigen_numel() + g.dim * a.dim


class FactoredEigenBlock(EigenBlock):
    """Eigendecomposed factors, factored (pi) Tikhonov damping: the same preconditioner as the
    Cholesky method, from eigenbases (so A and G may be decomposed on different ranks)."""

    def denominator(self, d_a: Tensor, d_g: Tensor, damping: float) -> Tensor:
        """1 / ((d_G + sqrt(l)/pi)(d_A + pi sqrt(l))^T), pi from the factors' traces (sums of
        their eigenvalues)."""
        pi = curvature.tikhonov_pi(d_a, d_g)
        root = math.sqrt(damping)
        return torch.outer((d_g + root / pi).reciprocal(), (d_a + pi * root).reciprocal())


def safe_eigh(factor: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor] | None:
    """eigh, retried in float64 on the rescaled factor with jitter; None if both fail or give
    non-finite values."""
    if factor is None or not bool(curvature.all_finite(factor)):
        return None
    try:
        q, d = curvature.eigen_decompose(factor, dtype)
        if bool(torch.isfinite(d).all()):
            return q, d
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        pass
    try:
        scale = factor.abs().max().double().clamp(min=1e-30)
        jittered = factor.double() / scale
        if factor.dim() == 2:
            jittered = jittered + 1e-10 * torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
        q, d = curvature.eigen_decompose(jittered, torch.float64)
        if bool(torch.isfinite(d).all()):
            return (q.to(dtype) if q is not None else None), (d * scale).to(dtype)
    except RuntimeError:
        pass
    return None
