"""Both damping modes of both inverse methods against explicit Kronecker solves, and subsampled
factor statistics: exact when the subsample is the whole batch, exact on a batch of identical
samples whatever the draw (the G scaling), unbiased in expectation over draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.testing.oracles import capture_output_grads, damped_kronecker_solve, linear_factors, relative_error

pytestmark = pytest.mark.usefixtures("float64_default")


def _pre(module: nn.Module, **kwargs) -> KFACPreconditioner:
    settings = dict(kl_clip=None, inv_update_freq=1, factor_dtype=torch.float64, inverse_dtype=torch.float64)
    return KFACPreconditioner(module, **{**settings, **kwargs})


@pytest.mark.parametrize("method,mode", [("eigen", "factored"), ("eigen", "exact"), ("cholesky", "factored")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_each_damping_mode_equals_its_explicit_kronecker_solve(method, mode, bias, damping):
    torch.manual_seed(int(damping * 1000) + bias)
    layer = nn.Linear(6, 4, bias=bias)
    pre = _pre(layer, inverse_method=method, damping_mode=mode, damping=damping)
    grads = capture_output_grads(layer)
    x = torch.randn(9, 6)
    (layer(x).tanh().sum() / 9).backward()
    v = layer.weight.grad if not bias else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    v = v.clone()
    pre.step()
    a, g = linear_factors(x, grads[0], bias=bias)
    out = layer.weight.grad if not bias else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    assert relative_error(out, damped_kronecker_solve(a, g, v, damping, mode)) <= 1e-8


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_factored_damping_of_a_diagonal_embedding_factor(method):
    torch.manual_seed(1)
    embed = nn.Embedding(7, 3)
    pre = _pre(embed, inverse_method=method, damping_mode="factored", damping=0.05)
    grads = capture_output_grads(embed)
    tokens = torch.randint(0, 7, (10, 4))
    (embed(tokens).sin().sum() / 10).backward()
    v = embed.weight.grad.T.clone()
    pre.step()
    counts = torch.bincount(tokens.reshape(-1), minlength=7).double() / tokens.numel()
    gy = grads[0].reshape(-1, 3)
    g = 10 * gy.T @ gy
    assert relative_error(embed.weight.grad.T, damped_kronecker_solve(counts, g, v, 0.05, "factored")) <= 1e-8


def test_exact_damping_with_the_cholesky_method_is_refused_naming_both_options():
    with pytest.raises(ValueError, match="inverse_method='cholesky' offers damping_mode='factored' only"):
        KFACConfig(inverse_method="cholesky", damping_mode="exact")
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        KFACConfig(damping_mode="tikhonov")


# --- subsampled statistics ------------------------------------------------------------------------
def _one_step_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs):
    pre = _pre(model, factor_decay=0.0, **kwargs)
    grads, inputs = capture_output_grads(model), []
    model.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().clone()))
    F.mse_loss(model(x), y).backward()
    pre.step()
    return pre.factors()[""], linear_factors(inputs[0], grads[0], bias=True)


def test_a_subsample_as_large_as_the_batch_is_the_full_estimate():
    torch.manual_seed(2)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    (a, g), (full_a, full_g) = _one_step_factors(nn.Linear(5, 3), x, y, factor_samples=16)
    assert relative_error(a, full_a) <= 1e-12 and relative_error(g, full_g) <= 1e-12


def test_any_subsample_of_identical_samples_gives_the_full_factors():
    # every sample the same: A and G of any subset equal those of the batch iff G is scaled B/b
    torch.manual_seed(3)
    x, y = torch.randn(1, 5).repeat(32, 1), torch.randn(1, 3).repeat(32, 1)
    (a, g), (full_a, full_g) = _one_step_factors(nn.Linear(5, 3), x, y, factor_samples=5)
    assert relative_error(a, full_a) <= 1e-12 and relative_error(g, full_g) <= 1e-12


def test_subsampled_factors_are_unbiased_over_draws():
    torch.manual_seed(4)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(40, 4), torch.randn(40, 3)
    pre = _pre(layer, factor_decay=0.0, factor_samples=8, inv_update_freq=1000, factor_update_freq=1)
    grads = capture_output_grads(layer)
    sums, draws = [torch.zeros(5, 5), torch.zeros(3, 3)], 400
    for _ in range(draws):  # the same batch and weights each step: only the draw changes
        layer.zero_grad()
        F.mse_loss(layer(x), y).backward()
        pre.step()
        for total, factor in zip(sums, pre.factors()[""], strict=True):
            total += factor
    full_a, full_g = linear_factors(x, grads[0], bias=True)
    # an 8-of-40 draw moves these factors by 20-40%; the mean of 400 draws by ~2%
    assert relative_error(sums[0] / draws, full_a) <= 0.05
    assert relative_error(sums[1] / draws, full_g) <= 0.05
    single = pre.factors()[""]
    assert relative_error(single[1], full_g) > 0.05  # one draw is not the full batch
