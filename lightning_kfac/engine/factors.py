"""One description of a Kronecker factor's layout: which side (A or G), its width, whether it is
diagonal (kept as a vector), and what follows from that: its shape in memory and in a
checkpoint, how many values travel (upper triangle of a dense symmetric factor), how it is
packed for the wire and unpacked on arrival, and how it is described to a user.

Every place that needs a factor's size (the exchange, checkpoints, the memory estimate, the
fit-start summary, the diagnostics) asks this object instead of working it out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_TRIU_CACHE: dict[tuple[int, str], Tensor] = {}


def triu_flat_indices(n: int, device: torch.device) -> Tensor:
    """Flat indices of the upper triangle (diagonal included) of an n x n matrix."""
    key = (n, str(device))
    cached = _TRIU_CACHE.get(key)
    if cached is None:
        rows, cols = torch.triu_indices(n, n, device=device)
        cached = rows * n + cols
        _TRIU_CACHE[key] = cached
    return cached


def pack_symmetric(matrix: Tensor) -> Tensor:
    """The n(n+1)/2 upper-triangle values of a symmetric matrix (a new tensor)."""
    n = matrix.shape[0]
    return matrix.reshape(-1)[triu_flat_indices(n, matrix.device)]


def unpack_symmetric(values: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`."""
    flat = values.new_zeros(n * n)
    flat[triu_flat_indices(n, values.device)] = values
    upper = flat.reshape(n, n)
    return upper + upper.triu(1).T


@dataclass(frozen=True)
class FactorLayout:
    """Layout of one factor of one layer.

    Args:
        side: ``"A"`` (input side) or ``"G"`` (output-gradient side).
        dim: width n of the factor (n x n, or n values when diagonal).
        diagonal: the factor is diagonal and kept as a vector (an Embedding's A).
    """

    side: str
    dim: int
    diagonal: bool = False

    @property
    def key(self) -> str:
        """``"a"`` or ``"g"``: the suffix of the factor's state keys (``running_a``, ...)."""
        return self.side.lower()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.diagonal else (self.dim, self.dim)

    @property
    def numel(self) -> int:
        return self.dim if self.diagonal else self.dim * self.dim

    def wire_numel(self, symmetric: bool) -> int:
        """Values sent per factor: n (diagonal), n(n+1)/2 (symmetric packing) or n^2."""
        if self.diagonal:
            return self.dim
        return self.dim * (self.dim + 1) // 2 if symmetric else self.dim * self.dim

    def pack(self, factor: Tensor, symmetric: bool) -> Tensor:
        """What travels for ``factor`` (its upper triangle when packing a dense factor)."""
        return pack_symmetric(factor) if symmetric and not self.diagonal else factor

    def unpack(self, values: Tensor, symmetric: bool) -> Tensor:
        """The factor from what :meth:`pack` sent."""
        if symmetric and not self.diagonal:
            return unpack_symmetric(values, self.dim)
        return values.reshape(self.shape)

    def describe(self) -> str:
        """``"65x65"``, or ``"100 (diagonal)"`` for a diagonal factor."""
        return f"{self.dim} (diagonal)" if self.diagonal else f"{self.dim}x{self.dim}"

    def eigen_numel(self) -> int:
        """Values an eigendecomposition keeps: eigenvectors (none for a diagonal) and eigenvalues."""
        return self.dim if self.diagonal else self.dim * self.dim + self.dim

    def inverse_numel(self) -> int:
        """Values a damped inverse keeps (a vector for a diagonal factor)."""
        return self.numel
