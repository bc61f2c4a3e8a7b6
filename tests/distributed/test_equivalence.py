"""Multi-process K-FAC (gloo, forked ranks) equals one process on the concatenated global batch,
and every rank ends with bitwise-identical parameters, in each distribution mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.models import SmallCNN, cnn_batches

STEPS = 5
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4
LR = 0.1


def train(rank: int, world_size: int, dtype: torch.dtype, fraction: float, method: str, split: bool = False):
    torch.manual_seed(0)
    model = SmallCNN().to(dtype)
    net = DistributedDataParallel(model) if world_size > 1 else model
    preconditioner = KFACPreconditioner(
        model,
        damping=0.01,
        inv_update_freq=2,
        factor_decay=0.9,
        kl_clip=1e-2,
        inverse_method=method,
        grad_worker_fraction=fraction,
        split_factors=split,
        factor_dtype=dtype,
        inverse_dtype=dtype,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    local = GLOBAL_BATCH // world_size
    for x, y in cnn_batches(STEPS, GLOBAL_BATCH, dtype):
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        preconditioner.step(lr=LR)
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _configs(world_size: int) -> list[tuple[float, str, bool]]:
    fractions = sorted({1.0, 1.0 / world_size} | ({0.5} if world_size == 4 else set()))
    configs = [(f, m, False) for f in fractions for m in ("eigen", "cholesky")]
    if world_size > 1:
        configs.append((1.0, "eigen", True))
    return configs


def train_all(rank: int, world_size: int, dtype: torch.dtype):
    return [train(rank, world_size, dtype, *config) for config in _configs(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 5e-5)])
def test_ranks_agree_and_equal_single_process(world_size, dtype, tolerance):
    per_rank = run_distributed(train_all, world_size, dtype, timeout=300)
    for index, config in enumerate(_configs(world_size)):
        reference = train(0, 1, dtype, *config)
        params = [results[index] for results in per_rank]
        for rank, p in enumerate(params[1:], start=1):
            assert torch.equal(p, params[0]), f"rank {rank} differs from rank 0 for {config}"
        error = float((params[0] - reference).norm() / reference.norm())
        assert error <= tolerance, f"{config}: relative error {error:.3g} vs single process"
