"""Negative round-off eigenvalues of rank-deficient factors must not reach the damped
denominators.

A batch smaller than a layer's width gives factors of low rank: the float32 factors the engine
accumulates are PSD only up to round-off, so their "zero" eigenvalues come out of either sign.
With exact damping, such an eigenvalue -eps of G times a large eigenvalue of A (or the other way
round) makes ``d_G d_A + lambda`` zero or negative once the damping is small: the step along
that direction explodes or changes sign, and the KL clip, a sum of ``|<V', V>|``, does not see
it. The engine clamps eigenvalues at zero after ``eigh`` and again where the denominators use
them; the expected step is the damped Kronecker solve with the factors' PSD projections, in
float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine import curvature
from lightning_kfac.testing.oracles import damped_kronecker_solve

# a layer much wider than the batch; residuals of scale 100 make G large, and the damping is small
N_IN, N_OUT, BATCH = 24, 16, 3
DAMPING = 1e-4
#: an L2 term in the loss: its gradient (WEIGHT_DECAY * W) lies outside the span of the batch's
#: inputs and output gradients, so V has parts along the factors' null directions
WEIGHT_DECAY = 1e-2


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def _psd_projection(factor: torch.Tensor) -> torch.Tensor:
    """The nearest PSD matrix: the factor with its negative eigenvalues set to zero (float64)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(factor.double())
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0.0)) @ eigenvectors.T


def _grad_matrix(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).double()


def _wide_layer_step(
    seed: int, damping_mode: str = "exact", **pre_kwargs: int
) -> tuple[nn.Linear, KFACPreconditioner, torch.Tensor]:
    """One step of eigen K-FAC on a small batch through a wide layer. Factors in
    float32 (their round-off is the point), decompositions in float64 (so that the eigenvalues the
    engine sees are those of the factors it holds, and the oracle can match them to 1e-6).
    Returns the layer (V' in its gradients), the preconditioner and V."""
    torch.manual_seed(seed)
    layer = nn.Linear(N_IN, N_OUT)
    pre = KFACPreconditioner(
        layer,
        damping=DAMPING,
        kl_clip=None,
        inverse_method="eigen",
        damping_mode=damping_mode,
        inverse_dtype=torch.float64,
        **pre_kwargs,
    )
    x, target = torch.randn(BATCH, N_IN), 100.0 * torch.randn(BATCH, N_OUT)
    loss = 0.5 * ((layer(x) - target) ** 2).sum(dim=1).mean() + 0.5 * WEIGHT_DECAY * layer.weight.square().sum()
    loss.backward()
    v = _grad_matrix(layer)
    pre.step()
    return layer, pre, v


def _unguarded_smallest_denominator(a: torch.Tensor, g: torch.Tensor) -> float:
    """min over pairs of d_G d_A + lambda with the factors' eigenvalues as they are (float64)."""
    d_a, d_g = torch.linalg.eigvalsh(a.double()), torch.linalg.eigvalsh(g.double())
    return float((torch.outer(d_g, d_a) + DAMPING).min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_batch_through_a_wide_layer_with_small_exact_damping_equals_the_psd_solve(seed):
    layer, pre, v = _wide_layer_step(seed)
    running_a, running_g = pre.factors()[""]
    assert running_a.dtype == torch.float32
    # the case reaches it: without a clamp some d_G d_A + lambda is negative
    assert _unguarded_smallest_denominator(running_a, running_g) < 0
    out = _grad_matrix(layer)
    expected = damped_kronecker_solve(_psd_projection(running_a), _psd_projection(running_g), v, DAMPING, "exact")
    assert bool(torch.isfinite(out).all())
    assert float((out * v).sum()) > 0  # a descent direction, as (G (x) A + lambda I)^-1 is positive definite
    assert _relative_error(out, expected) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_decompositions_of_rank_deficient_factors_hold_the_clamped_eigenvalues(seed):
    # what the engine keeps (and checkpoints, and broadcasts) is the PSD projection of the factor
    _, pre, _ = _wide_layer_step(seed)
    running_a, running_g = pre.factors()[""]
    saved = pre.state_dict()["layers"][""]
    for side, factor in (("a", running_a), ("g", running_g)):
        eigenvalues = torch.linalg.eigvalsh(factor.double())
        assert float(eigenvalues.min()) < 0, f"{side}: the float32 factor has negative round-off eigenvalues"
        d, q = saved[f"d_{side}"], saved[f"q_{side}"]
        assert float(d.min()) >= 0.0, f"d_{side} holds a negative eigenvalue"
        assert _relative_error(d.sort().values, eigenvalues.clamp(min=0.0)) <= 1e-12
        assert _relative_error(q @ torch.diag(d) @ q.T, _psd_projection(factor)) <= 1e-12


@pytest.mark.parametrize("damping_mode", ["exact"])
def test_a_loaded_decomposition_with_negative_eigenvalues_still_preconditions_with_the_psd_factors(damping_mode):
    # eigenvalues that never passed the clamp after eigh (a state written by hand, or by a build
    # without the clamp): the denominators' guard counts them as zero. A's smallest is set to
    # the round-off of bfloat16 factors, -2.5e-3 times its largest: far below gamma_A = pi
    # sqrt(lambda), so that factored damping would flip sign there too
    layer, pre, _ = _wide_layer_step(0, damping_mode, factor_update_freq=100, inv_update_freq=100)
    running_a, running_g = pre.factors()[""]
    state = pre.state_dict()
    for side, factor in (("a", running_a), ("g", running_g)):
        d, q = torch.linalg.eigh(factor.double())
        if side == "a":
            d[0] = -2.5e-3 * float(d[-1])
        state["layers"][""][f"d_{side}"], state["layers"][""][f"q_{side}"] = d, q
    pre.load_state_dict(state)
    layer.zero_grad()
    x, target = torch.randn(BATCH, N_IN), torch.randn(BATCH, N_OUT)
    (0.5 * ((layer(x) - target) ** 2).sum(dim=1).mean() + layer.weight.square().sum()).backward()
    v = _grad_matrix(layer)
    pre.step()  # step 1: neither factors nor decompositions are due, the loaded ones precondition
    assert torch.equal(pre.factors()[""][1], running_g)  # (no factor update happened)
    out = _grad_matrix(layer)
    expected = damped_kronecker_solve(_psd_projection(running_a), _psd_projection(running_g), v, DAMPING, damping_mode)
    assert bool(torch.isfinite(out).all())
    assert float((out * v).sum()) > 0
    assert _relative_error(out, expected) <= 1e-6


# --- the guard on its own: the denominators of both damping forms -------------------------------
def _eigenvalues_with_round_off() -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of a large G and a smaller A, both rank-deficient, with round-off of the size
    float32 factors show (G's -2e-3, A's -4e-7) and bfloat16 ones (A's -5e-2)."""
    d_g = torch.tensor([-2e-3, -1e-9, 0.0, 5.0, 6e4], dtype=torch.float64)
    d_a = torch.tensor([-5e-2, -4e-7, 0.0, 1e-8, 3.0, 16.0, 20.0], dtype=torch.float64)
    return d_g, d_a


def test_exact_denominator_counts_negative_eigenvalues_as_zero():
    d_g, d_a = _eigenvalues_with_round_off()
    assert float((torch.outer(d_g, d_a) + DAMPING).min()) < 0  # unguarded, the sign flips
    denominator = 1.0 / curvature.eigen_inverse_denominator(d_g, d_a, DAMPING)
    expected = torch.tensor(
        [[max(g, 0.0) * max(a, 0.0) + DAMPING for a in d_a.tolist()] for g in d_g.tolist()], dtype=torch.float64
    )
    assert float(denominator.min()) >= DAMPING
    assert _relative_error(denominator, expected) <= 1e-14
    assert float(d_g.min()) < 0 and float(d_a.min()) < 0  # the caller's eigenvalues are left alone


def test_factored_denominator_counts_negative_eigenvalues_as_zero():
    # G much larger than A: pi is small, and so is gamma_A = pi sqrt(lambda), below the round-off of A
    d_g, d_a = _eigenvalues_with_round_off()
    clamped_g, clamped_a = d_g.clamp(min=0.0).tolist(), d_a.clamp(min=0.0).tolist()
    pi = math.sqrt((sum(clamped_a) / len(clamped_a)) / (sum(clamped_g) / len(clamped_g)))
    gamma_a, gamma_g = pi * math.sqrt(DAMPING), math.sqrt(DAMPING) / pi
    assert float(d_a.min()) + gamma_a < 0  # unguarded, that damped eigenvalue of A is negative
    denominator = 1.0 / curvature.factored_eigen_inverse_denominator(d_g, d_a, DAMPING)
    expected = torch.tensor(
        [[(g + gamma_g) * (a + gamma_a) for a in clamped_a] for g in clamped_g], dtype=torch.float64
    )
    assert float(denominator.min()) >= gamma_a * gamma_g
    assert _relative_error(denominator, expected) <= 1e-14
