"""Direct checks against explicit math for corrections that other tests only reach indirectly:
the loss-scale correction given as a tensor, gradient accumulation over micro-batches, the factor
update interval, and the factored damping of the eigen method. Each test computes its expected
factors or step from the batches with its own code (``docs/conventions.md``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner

N_IN, N_OUT = 6, 4


@pytest.fixture(autouse=True)
def _float64_default(float64_default):
    """Every test here runs with float64 as the default dtype (oracles at 1e-10)."""


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def _squared_error(layer: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = (1/B) sum_i 0.5 ||y_i - t_i||^2: the per-sample output gradient B dL/dy_i is the
    residual y_i - t_i, known in closed form."""
    return 0.5 * ((layer(x) - target) ** 2).sum(dim=1).mean()


def _expected_factors(layer: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (1/B) sum a a^T with a = [x; 1]; G = (1/B) sum r r^T with r = y - t."""
    with torch.no_grad():
        residual = layer(x) - target
    a = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    return a.T @ a / x.shape[0], residual.T @ residual / x.shape[0]


def _grad_matrix(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).clone()


def _layer(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(N_IN, N_OUT)


# --- the loss-scale correction, on the tensor path ------------------------------------------------
@pytest.mark.parametrize(
    "grad_scale",
    [
        pytest.param(lambda s: torch.tensor(s, dtype=torch.float32), id="float32-tensor"),  # GradScaler's dtype
        pytest.param(lambda s: torch.tensor([s], dtype=torch.float64), id="float64-tensor-1"),
        pytest.param(float, id="python-float"),
    ],
)
def test_loss_scale_is_divided_out_of_g_squared_for_a_tensor_scale(grad_scale):
    # under a loss scale s every output gradient is s times too large, so G must be divided by
    # s^2; dividing by s leaves G s = 65536 times too large, dividing by s^3 as much too small
    scale = 2.0**16
    layer = _layer(seed=1)
    x, target = torch.randn(10, N_IN), torch.randn(10, N_OUT)
    a, g = _expected_factors(layer, x, target)
    pre = KFACPreconditioner(layer, kl_clip=None, factor_dtype=torch.float64, inverse_dtype=torch.float64)
    (_squared_error(layer, x, target) * scale).backward()
    pre.step(grad_scale=grad_scale(scale))
    running_a, running_g = pre.factors()[""]
    assert _relative_error(running_g, g) <= 1e-12
    assert _relative_error(running_a, a) <= 1e-12  # A sees no loss scale


# --- gradient accumulation: k micro-batches are one batch of k times the rows ---------------------
@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulated_micro_batches_give_the_factors_of_the_whole_batch(micro_batches):
    # each micro-batch loss is divided by k (as Lightning's accumulate_grad_batches does), so
    # each backward sees output gradients 1/k of its own mean loss's: G needs k^2 / passes
    layer = _layer(seed=2)
    x, target = torch.randn(12, N_IN), torch.randn(12, N_OUT)
    a, g = _expected_factors(layer, x, target)
    pre = KFACPreconditioner(layer, kl_clip=None, factor_dtype=torch.float64, inverse_dtype=torch.float64)
    pre.accumulation_steps = micro_batches
    for x_part, target_part in zip(x.chunk(micro_batches), target.chunk(micro_batches), strict=True):
        (_squared_error(layer, x_part, target_part) / micro_batches).backward()
    pre.step()
    running_a, running_g = pre.factors()[""]
    assert _relative_error(running_a, a) <= 1e-12
    assert _relative_error(running_g, g) <= 1e-12


# --- the factor update interval: updates at steps 0, k, 2k, ... and nowhere else ------------------
@pytest.mark.parametrize("interval,steps", [(1, 4), (3, 10), (4, 9)])
def test_running_factors_average_exactly_the_steps_of_the_interval(interval, steps):
    decay = 0.7
    layer = _layer(seed=3)
    pre = KFACPreconditioner(
        layer,
        factor_update_freq=interval,
        inv_update_freq=interval,
        factor_decay=decay,
        kl_clip=None,
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
    )
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    expected_a = expected_g = None
    updates = 0
    for step in range(steps):
        x, target = torch.randn(8, N_IN), torch.randn(8, N_OUT)
        a, g = _expected_factors(layer, x, target)  # of this step's parameters, before it moves
        optimizer.zero_grad()
        _squared_error(layer, x, target).backward()
        pre.step(lr=0.05)
        optimizer.step()
        if step % interval == 0:
            updates += 1
            if expected_a is None:  # the first update replaces (no identity start)
                expected_a, expected_g = a, g
            else:
                expected_a = decay * expected_a + (1 - decay) * a
                expected_g = decay * expected_g + (1 - decay) * g
        running_a, running_g = pre.factors()[""]
        for side, running, expected in (("A", running_a, expected_a), ("G", running_g, expected_g)):
            error = _relative_error(running, expected)
            assert error <= 1e-12, f"{side} after step {step} ({updates} updates due): relative error {error:.3g}"
    meta = pre.state_dict()["layer_meta"][""]
    assert (meta["a_updates"], meta["g_updates"]) == (updates, updates) == (math.ceil(steps / interval),) * 2


# --- factored damping of the eigen method ---------------------------------------------------------
def _kronecker_solves(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, damping: float):
    """(factored, exact) preconditioned gradients as explicit torch.kron solves, vec row-major."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)
    eye_a, eye_g = torch.eye(a.shape[0]), torch.eye(g.shape[0])
    factored = torch.kron(g + (root / pi) * eye_g, a + (pi * root) * eye_a)
    exact = torch.kron(g, a) + damping * torch.kron(eye_g, eye_a)
    return (torch.linalg.solve(system, v.reshape(-1)).reshape(v.shape) for system in (factored, exact))


@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_eigen_method_with_factored_damping_equals_the_damped_factors_solve(damping):
    # A (bias column of ones, inputs of scale 3) and G (residuals of scale 0.1) on different
    # scales: pi is far from 1, and exact damping of the product differs from factored damping
    layer = _layer(seed=4)
    x, target = 3.0 * torch.randn(9, N_IN), 0.1 * torch.randn(9, N_OUT)
    with torch.no_grad():
        target += layer(x)
    a, g = _expected_factors(layer, x, target)
    pre = KFACPreconditioner(
        layer,
        damping=damping,
        kl_clip=None,
        inverse_method="eigen",
        damping_mode="factored",
        factor_dtype=torch.float64,
        inverse_dtype=torch.float64,
    )
    _squared_error(layer, x, target).backward()
    v = _grad_matrix(layer)
    pre.step()
    factored, exact = _kronecker_solves(a, g, v, damping)
    assert _relative_error(_grad_matrix(layer), factored) <= 1e-9
    assert _relative_error(exact, factored) >= 0.1  # so the test tells the two forms apart
