"""Ranks with unequal local batches: the global factors are those of the concatenated global
batch, i.e. every rank's factor weighted by its rows (``docs/conventions.md``, "Which rows a
factor update averages"). Equal batches cannot tell this from a plain mean over ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.distributed import run_distributed

#: local batch of each rank: 3 and 9 rows, so a mean over ranks weights rank 0's rows 3x too much
LOCAL_BATCHES = (3, 9)
N_IN, N_HIDDEN, N_OUT = 5, 4, 3


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT)).double()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows = sum(LOCAL_BATCHES)
    x = torch.randn(rows, N_IN, generator=generator, dtype=torch.float64)
    return x, torch.randn(rows, N_OUT, generator=generator, dtype=torch.float64)


def _local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(LOCAL_BATCHES[:rank])
    return tensor[start : start + LOCAL_BATCHES[rank]]


def _squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over the local batch of 0.5 ||y_i - t_i||^2 (each rank its own mean, as under DDP)."""
    return 0.5 * ((output - target) ** 2).sum(dim=1).mean()


def _factors_on_ranks(rank: int, world_size: int, steps: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model = _model()
    pre = KFACPreconditioner(
        model, factor_decay=0.5, kl_clip=None, factor_dtype=torch.float64, inverse_dtype=torch.float64
    )
    x, target = _global_batch()
    for _ in range(steps):  # the same batch every step: the running average stays at its factor
        model.zero_grad()
        _squared_error(model(_local(x, rank)), _local(target, rank)).backward()
        pre.step()
    # the layers' owners hold their running factors
    return {name: factors for name, factors in pre.factors().items() if factors[0] is not None}


def _pooled_factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A and G of each Linear layer on the concatenated global batch, from its inputs and
    per-sample output gradients: A = (1/N) sum a a^T, G = (1/N) sum g g^T, g_i = N dL/dy_i."""
    model = _model()
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in ("0", "2"):

        def keep(module, args, output, name=name):
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output

        model.get_submodule(name).register_forward_hook(keep)
    x, target = _global_batch()
    _squared_error(model(x), target).backward()
    rows = x.shape[0]
    expected = {}
    for name in inputs:
        a = torch.cat([inputs[name], torch.ones(rows, 1, dtype=torch.float64)], dim=1)
        g = rows * outputs[name].grad
        expected[name] = (a.T @ a / rows, g.T @ g / rows)
    return expected


@pytest.mark.parametrize("steps", [1, 2])
def test_unequal_local_batches_give_the_factors_of_the_pooled_batch(steps):
    per_rank = run_distributed(_factors_on_ranks, len(LOCAL_BATCHES), steps, timeout=120)
    held = {name: factors for factors in per_rank for name, factors in factors.items()}
    expected = _pooled_factors()
    assert set(held) == set(expected), (sorted(held), sorted(expected))
    for name, (a, g) in expected.items():
        running_a, running_g = held[name]
        for side, running, pooled in (("A", running_a, a), ("G", running_g, g)):
            error = float((running - pooled).norm() / pooled.norm())
            assert error <= 1e-12, f"{side} of layer {name}: relative error {error:.3g} against the pooled batch"
