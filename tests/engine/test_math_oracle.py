"""The engine against independent math: explicit torch.kron solves and per-position loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine import curvature
from lightning_kfac.testing.oracles import conv2d_factors_by_positions


@pytest.fixture(autouse=True)
def _float64_default(float64_default):
    """Every test here runs with float64 as the default dtype."""


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def _linear_problem(batch: int, n_in: int, n_out: int, bias: bool, seed: int):
    """A Linear layer with loss (1/B) sum_i 0.5 ||y_i - t_i||^2, whose per-sample output
    gradient B * dL/dy_i = y_i - t_i is known in closed form."""
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).double()
    x = torch.randn(batch, n_in)
    target = torch.randn(batch, n_out)
    return layer, x, target


def _expected_factors(layer: nn.Linear, x: torch.Tensor, target: torch.Tensor):
    with torch.no_grad():
        y = layer(x)
    a = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1) if layer.bias is not None else x
    g = y - target
    batch = x.shape[0]
    return a.T @ a / batch, g.T @ g / batch


def _grad_matrix(layer: nn.Linear) -> torch.Tensor:
    v = layer.weight.grad.clone()
    if layer.bias is not None:
        v = torch.cat([v, layer.bias.grad.clone().unsqueeze(1)], dim=1)
    return v


def _run_step(layer, x, target, **kwargs):
    pre = KFACPreconditioner(layer, inverse_dtype=torch.float64, factor_dtype=torch.float64, **kwargs)
    loss = 0.5 * ((layer(x) - target) ** 2).sum(dim=1).mean()
    loss.backward()
    v = _grad_matrix(layer)
    pre.step()
    return pre, v, _grad_matrix(layer)


SHAPES = [(16, 5, 3), (7, 12, 4), (32, 3, 9), (4, 8, 8)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_eigen_step_equals_kronecker_solve(batch, n_in, n_out, bias, damping):
    layer, x, target = _linear_problem(batch, n_in, n_out, bias, seed=batch + n_in)
    a, g = _expected_factors(layer, x, target)
    _, v, preconditioned = _run_step(
        layer, x, target, damping=damping, kl_clip=None, inv_update_freq=1, inverse_method="eigen", damping_mode="exact"
    )
    # (G (x) A + lambda I) vec(V') = vec(V), vec row-major over V (out, in+1)
    system = torch.kron(g, a) + damping * torch.eye(g.shape[0] * a.shape[0])
    expected = torch.linalg.solve(system, v.reshape(-1)).reshape(v.shape)
    assert _relative_error(preconditioned, expected) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_cholesky_step_equals_factored_tikhonov(batch, n_in, n_out, bias):
    damping = 0.01
    layer, x, target = _linear_problem(batch, n_in, n_out, bias, seed=3 * batch + n_out)
    a, g = _expected_factors(layer, x, target)
    _, v, preconditioned = _run_step(
        layer, x, target, damping=damping, kl_clip=None, inv_update_freq=1, inverse_method="cholesky"
    )
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)
    g_damped = g + (root / pi) * torch.eye(g.shape[0])
    a_damped = a + (pi * root) * torch.eye(a.shape[0])
    # the factored form is itself a Kronecker solve: (G_d (x) A_d) vec(V') = vec(V)
    expected = torch.linalg.solve(torch.kron(g_damped, a_damped), v.reshape(-1)).reshape(v.shape)
    assert _relative_error(preconditioned, expected) <= 1e-5


def test_running_average_first_update_replaces_then_ema():
    layer, _, _ = _linear_problem(10, 4, 3, True, seed=0)
    decay = 0.8
    pre = KFACPreconditioner(layer, factor_decay=decay, factor_update_freq=1, kl_clip=None, factor_dtype=torch.float64)
    expected_a, expected_g = None, None
    for step in range(3):
        x = torch.randn(10, 4)
        t = torch.randn(10, 3)
        a, g = _expected_factors(layer, x, t)
        layer.zero_grad()
        (0.5 * ((layer(x) - t) ** 2).sum(dim=1).mean()).backward()
        pre.step()
        if step == 0:
            expected_a, expected_g = a, g
        else:
            expected_a = decay * expected_a + (1 - decay) * a
            expected_g = decay * expected_g + (1 - decay) * g
        running_a, running_g = pre.factors()[""]
        assert _relative_error(running_a, expected_a) <= 1e-12
        assert _relative_error(running_g, expected_g) <= 1e-12


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_in_place_running_average_and_finiteness_check(bad):
    torch.manual_seed(0)
    running = torch.rand(6, 6, dtype=torch.float64)
    batch = torch.rand(6, 6, dtype=torch.float64)
    before = running.clone()
    expected = 0.9 * running + 0.1 * batch
    if bad is not None:
        batch[2, 3] = bad
    finite = curvature.all_finite(batch)
    assert bool(finite) == (bad is None) == bool(torch.isfinite(batch).all())
    out = curvature.running_average_(running, batch, 0.9, finite)
    assert out is running
    if bad is None:
        assert _relative_error(running, expected) <= 1e-15
    else:
        assert torch.equal(running, before)  # exactly unchanged, no NaN leaked through
    assert bool(curvature.all_finite(torch.empty(0)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [0.95, 0.99])
def test_in_place_running_average_does_not_drift_in_half_precision(dtype, decay):
    # thousands of updates of a low-precision factor must stay at the float64 average: the two
    # weights have to sum to one exactly (a separately rounded d and 1 - d shrinks or grows it).
    # The batches spread widely enough that each update moves a bf16 value by more than half
    # an ulp; narrower ones stall any bf16 running average at decay 0.99, in place or not.
    generator = torch.Generator().manual_seed(0)
    running, reference = None, None
    for _ in range(3000):
        batch = 2.0 + 4.0 * (torch.rand(16, 16, generator=generator, dtype=torch.float64) - 0.5)
        if running is None:
            running, reference = batch.to(dtype), batch.clone()
            continue
        reference = decay * reference + (1 - decay) * batch
        low = batch.to(dtype)
        curvature.running_average_(running, low, decay, curvature.all_finite(low))
    assert abs(float(running.double().mean() / reference.mean()) - 1.0) < 0.02


def test_factor_update_freq_skips_recording():
    layer, x, t = _linear_problem(10, 4, 3, True, seed=1)
    pre = KFACPreconditioner(layer, factor_update_freq=2, factor_decay=0.5, kl_clip=None, factor_dtype=torch.float64)
    batches = [(torch.randn(10, 4), torch.randn(10, 3)) for _ in range(3)]
    for x, t in batches:
        layer.zero_grad()
        (0.5 * ((layer(x) - t) ** 2).sum(dim=1).mean()).backward()
        pre.step()
    # steps 0 and 2 record, step 1 does not
    a0, _ = _expected_factors(layer, *batches[0])
    a2, _ = _expected_factors(layer, *batches[2])
    running_a, _ = pre.factors()[""]
    assert _relative_error(running_a, 0.5 * a0 + 0.5 * a2) <= 1e-12


def test_kl_clip_scale_matches_formula():
    layer, x, target = _linear_problem(16, 6, 4, True, seed=5)
    lr, kl_clip, damping = 0.5, 1e-4, 1e-3
    _, v, unclipped = _run_step(layer, x, target, damping=damping, kl_clip=None, inv_update_freq=1)
    layer.zero_grad()
    pre, _, clipped = _run_step(layer, x, target, damping=damping, kl_clip=kl_clip, inv_update_freq=1, lr=lr)
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * float((unclipped * v).sum()))))
    assert nu < 1.0  # the case exercises clipping
    assert abs(float(pre.last_kl_scale) - nu) <= 1e-10 * nu
    assert _relative_error(clipped, nu * unclipped) <= 1e-10


def test_kl_clip_without_lr_is_a_clear_error():
    layer, x, target = _linear_problem(8, 3, 2, True, seed=2)
    with pytest.raises(ValueError, match="kl_clip is set but no learning rate"):
        _run_step(layer, x, target, kl_clip=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1, bias=True),
        dict(kernel_size=3, stride=2, padding=0, bias=False),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), bias=True),
    ],
)
def test_conv2d_factors_equal_per_position_computation(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(5, 3, 7, 8)
    pre = KFACPreconditioner(conv, factor_dtype=torch.float64, kl_clip=None)
    y = conv(x)
    captured = {}
    y.register_hook(lambda grad: captured.setdefault("gy", grad.clone()))
    (y.sin().sum() / x.shape[0]).backward()
    pre.step()
    expected_a, expected_g = conv2d_factors_by_positions(conv, x, captured["gy"])
    running_a, running_g = pre.factors()[""]
    assert _relative_error(running_a, expected_a) <= 1e-10
    assert _relative_error(running_g, expected_g) <= 1e-10


def test_conv2d_step_equals_kronecker_solve():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1).double()
    x = torch.randn(4, 2, 5, 5)
    damping = 0.05
    pre = KFACPreconditioner(
        conv, factor_dtype=torch.float64, inverse_dtype=torch.float64, kl_clip=None, damping=damping,
        inverse_method="eigen", damping_mode="exact",
    )  # fmt: skip
    (conv(x).tanh().sum() / 4).backward()
    v = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1).clone()
    pre.step()
    a, g = pre.factors()[""]
    out = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1)
    expected = torch.linalg.solve(
        torch.kron(g, a) + damping * torch.eye(g.numel() // g.shape[0] * a.shape[0]), v.reshape(-1)
    )
    assert _relative_error(out, expected.reshape(v.shape)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_inverses_are_exactly_symmetric_as_a_receiver_unpacks_them(dtype):
    # owners keep the inverse they computed, receivers unpack its upper triangle: the two must be
    # the same matrix bit for bit, row-major, for every rank's matmuls to agree
    torch.manual_seed(0)
    x = torch.randn(400, 129, dtype=dtype)
    a = x.T @ x / 400
    g = a[:33, :33].clone()
    for inverse in curvature.damped_cholesky_inverses(a, g, 1e-3, dtype):
        n = inverse.shape[0]
        assert inverse.is_contiguous()
        assert torch.equal(inverse, curvature.unpack_symmetric(curvature.pack_symmetric(inverse), n))
