"""Pure functions on tensors: running averages, damped decompositions, preconditioning and
KL clipping, exactly as ``docs/conventions.md`` defines them.

Nothing here knows about modules, ranks or Lightning; each function is tested against an
explicit Kronecker solve.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_kfac.engine.factors import pack_symmetric, triu_flat_indices, unpack_symmetric

__all__ = [
    "all_finite",
    "cholesky_precondition",
    "damped_cholesky_inverses",
    "eigen_decompose",
    "eigen_inverse_denominator",
    "eigen_precondition",
    "factored_eigen_inverse_denominator",
    "inner",
    "intra_op_threads",
    "kl_clip_scale",
    "kl_clip_scale_of",
    "pack_symmetric",
    "running_average_",
    "tikhonov_pi",
    "triu_flat_indices",
    "unpack_symmetric",
]


def all_finite(tensor: Tensor) -> Tensor:
    """0-dim bool tensor: no NaN or Inf in ``tensor`` (no host sync).

    One reduction pass without a temporary, against ``isfinite(t).all()``'s three passes and
    a full-size bool tensor: min and max propagate NaN, and an Inf is the min or the max.
    """
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def running_average_(running: Tensor, batch: Tensor, decay: float, finite: Tensor) -> Tensor:
    """The running average ``decay * running + (1 - decay) * batch``, in place and with no
    temporary of the factor's size: ``running <- running + w (batch - running)`` with
    ``w = 1 - decay`` when ``finite`` (:func:`all_finite` of ``batch``) holds and 0 otherwise,
    so a non-finite batch factor leaves ``running`` exactly as it was, decided on the device
    without a host synchronisation. (The first update, which replaces, is the caller's.) The lerp
    form keeps the two weights
    summing to one in bf16/fp16 too, where ``d * running + (1 - d) * batch`` drifts. ``batch`` is
    the caller's scratch: its NaN/Inf entries are zeroed (``0 * NaN`` would reach ``running``)."""
    batch.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return running.lerp_(batch, finite.to(running.dtype) * (1.0 - decay))


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads (``None``: as torch is set). CPU eigh,
    Cholesky and long dot products round differently with different thread counts, and
    launchers pick the count per node layout (Lightning: CPUs / local processes; torchrun: 1
    only with several processes per node), so K-FAC fixes it for those operations to give the
    same results on any layout. Device (GPU) work does not depend on it."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- eigen -----------------------------------------------------------------------------------
def eigen_decompose(factor: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """(Q, d) with factor = Q diag(d) Q^T; negative round-off eigenvalues are clamped to 0.
    A diagonal factor (a vector) is its own eigendecomposition: Q = None stands for I."""
    if factor.dim() == 1:
        return None, factor.to(dtype).clamp(min=0.0)
    eigenvalues, eigenvectors = torch.linalg.eigh(factor.to(dtype))
    # eigh returns column-major storage; a row-major copy makes every rank's matmuls (owner's
    # and receivers' of the broadcast copy) take the same kernel path, so results agree bitwise
    return eigenvectors.contiguous(), eigenvalues.clamp_(min=0.0)


def eigen_inverse_denominator(d_g: Tensor, d_a: Tensor, damping: float) -> Tensor:
    """1 / (d_G d_A^T + lambda): precomputed once per inversion, used every step.

    Eigenvalues below zero count as zero, so that every denominator is at least lambda. A
    rank-deficient factor (a batch smaller than the layer's width) has eigenvalues that are zero
    only up to round-off, of either sign; one of them, -eps, times a large eigenvalue of the
    other factor makes d_G d_A + lambda zero or negative: a step that explodes or points uphill
    in that direction, which the KL clip (a sum of |<V', V>|) does not see. :func:`eigen_decompose`
    clamps; this guard holds for eigenvalues that come from elsewhere (a loaded state)."""
    return torch.outer(_nonnegative(d_g), _nonnegative(d_a)).add_(damping).reciprocal_()


def factored_eigen_inverse_denominator(d_g: Tensor, d_a: Tensor, damping: float) -> Tensor:
    """1 / ((d_G + sqrt(l)/pi)(d_A + pi sqrt(l))^T), pi from the factors' traces (the sums of
    their eigenvalues): the factored Tikhonov damping in the eigenbases. Eigenvalues below zero
    count as zero (as in :func:`eigen_inverse_denominator`), so each damped eigenvalue is at
    least its gamma > 0."""
    d_g, d_a = _nonnegative(d_g), _nonnegative(d_a)
    pi = tikhonov_pi(d_a, d_g)
    root = math.sqrt(damping)
    return torch.outer((d_g + root / pi).reciprocal(), (d_a + pi * root).reciprocal())


def _nonnegative(eigenvalues: Tensor) -> Tensor:
    # a new tensor: the caller's eigenvalues (kept, checkpointed, broadcast) stay as they are
    return eigenvalues.clamp(min=0.0)


def eigen_precondition(grad: Tensor, q_a: Tensor | None, q_g: Tensor, inv_denominator: Tensor) -> Tensor:
    """Q_G [(Q_G^T V Q_A) / (d_G d_A^T + lambda)] Q_A^T = (G (x) A + lambda I)^-1 vec(V)
    (Q_A = None: A is diagonal)."""
    # the rotated gradient is a temporary of our own: scaled in place, one allocation fewer
    if q_a is None:
        return q_g @ (q_g.T @ grad).mul_(inv_denominator)
    rotated = q_g.T @ grad @ q_a
    return q_g @ rotated.mul_(inv_denominator) @ q_a.T


# --- cholesky (factored Tikhonov) ------------------------------------------------------------
def tikhonov_pi(a: Tensor, g: Tensor) -> Tensor:
    """pi = sqrt((tr(A)/dim A) / (tr(G)/dim G)), computed on the device (no host sync). Either
    factor may be given as its diagonal (a vector)."""
    mean_a = (a if a.dim() == 1 else torch.diagonal(a)).mean()
    mean_g = (g if g.dim() == 1 else torch.diagonal(g)).mean()
    tiny = torch.finfo(a.dtype).tiny
    return torch.sqrt(mean_a.clamp(min=tiny) / mean_g.clamp(min=tiny))


def damped_cholesky_inverses(a: Tensor, g: Tensor, damping: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A + pi sqrt(l) I)^-1 and (G + sqrt(l)/pi I)^-1 via Cholesky factorisations (a
    diagonal A, given as a vector, is inverted element-wise and returned as a vector)."""
    a = a.to(dtype)
    g = g.to(dtype)
    pi = tikhonov_pi(a, g)
    root = math.sqrt(damping)
    a_inv = (a + pi * root).reciprocal() if a.dim() == 1 else _spd_inverse(a, pi * root)
    g_inv = _spd_inverse(g, root / pi)
    return a_inv, g_inv


def _spd_inverse(matrix: Tensor, shift: Tensor) -> Tensor:
    shifted = matrix.clone()
    shifted.diagonal().add_(shift)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted))
    # the result must be exactly symmetric, as from its upper triangle: that is what a receiver
    # unpacks after a packed broadcast. torch's CPU kernel already mirrors one triangle into the
    # other (column-major), so its transpose is that matrix, row-major, for free; elsewhere mirror.
    if inverse.device.type == "cpu" and inverse.mT.is_contiguous():
        return inverse.mT
    return inverse.triu() + inverse.triu(1).mT


def cholesky_precondition(grad: Tensor, a_inv: Tensor, g_inv: Tensor) -> Tensor:
    """(G + sqrt(l)/pi I)^-1 V (A + pi sqrt(l) I)^-1 (a_inv a vector: A is diagonal)."""
    if a_inv.dim() == 1:
        return (g_inv @ grad) * a_inv
    return g_inv @ grad @ a_inv


# --- KL clipping -----------------------------------------------------------------------------
def kl_clip_scale_of(pairs: list[tuple[Tensor, Tensor]], lr: float, kl_clip: float) -> Tensor:
    """:func:`kl_clip_scale` of the layers' (V', V) pairs, summed in float64 in the given order
    (one fixed order on every rank gives bitwise-equal sums)."""
    vg_sum = torch.zeros((), dtype=torch.float64, device=pairs[0][0].device)
    for preconditioned, grad in pairs:
        vg_sum += inner(preconditioned, grad)
    return kl_clip_scale(vg_sum, lr, kl_clip)


def inner(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> as a float64 scalar; half-precision inputs are summed in float32."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a, b).double()


def kl_clip_scale(vg_sum: Tensor, lr: float, kl_clip: float) -> Tensor:
    """nu = min(1, sqrt(kl_clip / (lr^2 sum <V', V>))), as a 0-dim tensor (no host sync)."""
    denominator = (vg_sum.abs() * (lr * lr)).clamp(min=torch.finfo(vg_sum.dtype).tiny)
    return torch.sqrt(kl_clip / denominator).clamp(max=1.0)
