"""The KL clip only ever shrinks a step: nu = min(1, sqrt(kl_clip / (lr^2 sum <V', V>))). Checked
where the unclipped factor would exceed 1 (it must be exactly 1 and the update the unclipped
Kronecker solve) and where it would not (the formula)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine import curvature
from lightning_kfac.testing.oracles import capture_output_grads, damped_kronecker_solve, linear_factors, relative_error

pytestmark = pytest.mark.usefixtures("float64_default")


def _step(kl_clip: float, lr: float, scale: float):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    pre = KFACPreconditioner(
        layer, damping=0.01, kl_clip=kl_clip, lr=lr, factor_dtype=torch.float64, inverse_dtype=torch.float64
    )
    grads = capture_output_grads(layer)
    x = torch.randn(8, 5)
    (scale * layer(x).sin().sum() / 8).backward()
    v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()
    pre.step()
    a, g = linear_factors(x, grads[0], bias=True)
    unclipped = damped_kronecker_solve(a, g, v, 0.01, "factored")
    out = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    return pre, v, unclipped, out


def test_a_clip_that_would_enlarge_the_step_leaves_it_unchanged():
    # small gradients, a loose bound: sqrt(kl_clip / (lr^2 <V', V>)) is far above 1
    pre, v, unclipped, out = _step(kl_clip=10.0, lr=1e-3, scale=1e-3)
    raw = math.sqrt(10.0 / (1e-6 * float((unclipped * v).sum())))
    assert raw > 100
    assert float(pre.last_kl_scale) == 1.0
    assert relative_error(out, unclipped) <= 1e-10


def test_a_clip_that_binds_scales_the_step_by_the_formula():
    pre, v, unclipped, out = _step(kl_clip=1e-6, lr=1.0, scale=10.0)
    nu = math.sqrt(1e-6 / float((unclipped * v).sum()))
    assert nu < 0.1
    assert float(pre.last_kl_scale) == pytest.approx(nu, rel=1e-9)
    assert relative_error(out, nu * unclipped) <= 1e-9


@pytest.mark.parametrize("vg_sum", [1e-12, 1e-3, 1.0, 1e6])
def test_the_clip_factor_is_min_of_one_and_the_ratio(vg_sum):
    scale = curvature.kl_clip_scale(torch.tensor(vg_sum, dtype=torch.float64), lr=0.1, kl_clip=1e-3)
    assert float(scale) == pytest.approx(min(1.0, math.sqrt(1e-3 / (0.01 * vg_sum))), rel=1e-12)
