"""Sanity check (not the benchmark): on scikit-learn's digits, K-FAC reaches a lower training loss
than plain SGD with the same model, learning rate and number of steps, for each of 3 seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.models import MLP

STEPS = 60
BATCH = 64
LR = 0.05


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-3)
    return x, torch.tensor(data.target)


def _train(x, y, seed: int, kfac: bool) -> float:
    torch.manual_seed(seed)
    model = MLP((64, 64, 64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    # batch 64: the small-batch settings of the README's guidance (more damping, a tighter clip)
    pre = KFACPreconditioner(model, damping=0.1, kl_clip=0.01, lr=LR) if kfac else None
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        index = torch.randint(0, len(x), (BATCH,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        if pre is not None:
            pre.step()
        optimizer.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfac_beats_sgd_on_training_loss(digits, seed):
    x, y = digits
    kfac_loss = _train(x, y, seed, kfac=True)
    sgd_loss = _train(x, y, seed, kfac=False)
    assert kfac_loss < sgd_loss, (kfac_loss, sgd_loss)
