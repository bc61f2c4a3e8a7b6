"""Assignment balance, packed traffic, per-rank factor memory, overlap with backward, wire dtypes
and invalid fractions, on forked gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac import KFACPreconditioner
from lightning_kfac.distributed import LayerShape, WorkPlan, balance_lower_bound
from lightning_kfac.distributed.assignment import factor_cost, lpt_assign
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.models import MLP, SmallCNN, cnn_batches


# --- balance (pure) ----------------------------------------------------------------------------
def resnet18_shapes(conv_bias: bool) -> list[LayerShape]:
    """(A, G) dims of torchvision's ResNet-18 K-FAC layers: 20 convolutions and the classifier.
    A = C_in k_h k_w (+1 with a bias), G = C_out."""
    b = int(conv_bias)
    shapes = [LayerShape("conv1", 3 * 7 * 7 + b, 64)]
    in_ch = 64
    for stage, out_ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            first_in = in_ch if block == 0 else out_ch
            shapes.append(LayerShape(f"layer{stage}.{block}.conv1", first_in * 9 + b, out_ch))
            shapes.append(LayerShape(f"layer{stage}.{block}.conv2", out_ch * 9 + b, out_ch))
            if block == 0 and stage > 1:
                shapes.append(LayerShape(f"layer{stage}.0.downsample", in_ch + b, out_ch))
        in_ch = out_ch
    shapes.append(LayerShape("fc", 512 + 1, 1000))
    return shapes


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("world_size", [4, 8])
@pytest.mark.parametrize("split", [False, True])
def test_resnet18_assignment_is_within_15_percent_of_the_lower_bound(conv_bias, world_size, split):
    shapes = resnet18_shapes(conv_bias)
    assert len(shapes) == 21 and max(s.a_dim for s in shapes) == 4608 + conv_bias
    plan = WorkPlan.build(shapes, world_size, world_size, "compute", split_factors=split)
    if split:
        costs = [factor_cost(d, "compute") for s in shapes for d in (s.a_dim, s.g_dim)]
    else:
        costs = [factor_cost(s.a_dim, "compute") + factor_cost(s.g_dim, "compute") for s in shapes]
    bound = balance_lower_bound(costs, world_size)
    assert max(plan.loads) <= 1.15 * bound
    assert sum(plan.loads) == pytest.approx(sum(costs))


def test_lpt_beats_equal_count_chunks_on_unequal_layers():
    costs = [100.0, 1.0, 1.0, 1.0, 90.0, 1.0, 1.0, 1.0]
    _, loads = lpt_assign(costs, 2)
    chunked = [sum(costs[:4]), sum(costs[4:])]
    assert max(loads) < max(chunked)
    assert max(loads) == balance_lower_bound(costs, 2)


# --- bytes and memory on forked ranks ----------------------------------------------------------
class WideMLP(nn.Module):
    """Eight equal K-FAC layers, so an even split is possible."""

    def __init__(self, width: int = 48, depth: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _two_steps(rank, world_size, model, make_batch, **options):
    net = DistributedDataParallel(model) if world_size > 1 else model
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_freq=1, factor_update_freq=1, **options)
    launched_in_backward = []
    for step in range(2):
        model.zero_grad()
        x, y = make_batch(step, rank)
        F.mse_loss(net(x), y).backward()
        launched_in_backward.append(pre.exchange.launched_buckets)
        pre.step()
    return pre, launched_in_backward


def measure(rank, world_size, symmetric: bool, wire: str | None):
    torch.manual_seed(0)
    model = MLP((64, 96, 96, 10))
    gen = torch.Generator().manual_seed(rank)
    pre, launched = _two_steps(
        rank,
        world_size,
        model,
        lambda s, r: (torch.randn(16, 64, generator=gen), torch.randn(16, 10, generator=gen)),
        symmetric_comm=symmetric,
        comm_dtype=wire,
    )
    params = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return pre.bytes_by_kind()["factor_reduce"], launched, params


def test_symmetric_packing_halves_factor_traffic_and_buckets_launch_during_backward():
    packed = run_distributed(measure, 2, True, None)
    full = run_distributed(measure, 2, False, None)
    ratio = packed[0][0] / full[0][0]
    assert ratio <= 0.51, ratio
    # step 0 exchanges in step() (the plan is built there); step 1 launches from the hooks
    assert packed[0][1][0] == 0 and packed[0][1][1] >= 1
    # same math; only float32 round-off differs (the packed factor is exactly symmetric)
    error = float((packed[0][2] - full[0][2]).norm() / full[0][2].norm())
    assert error < 1e-4, error


def test_bfloat16_wire_halves_bytes_again_and_stays_close():
    fp32 = run_distributed(measure, 2, True, None)
    bf16 = run_distributed(measure, 2, True, "bfloat16")
    assert bf16[0][0] * 2 == fp32[0][0]
    error = float((bf16[0][2] - fp32[0][2]).norm() / fp32[0][2].norm())
    assert error < 0.05, error


def memory(rank, world_size, fraction):
    torch.manual_seed(0)
    model = WideMLP()
    pre, _ = _two_steps(
        rank, world_size, model, lambda s, r: (torch.randn(8, 48), torch.randn(8, 48)), grad_worker_fraction=fraction
    )
    return pre.memory_usage()


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_four_ranks_hold_about_a_quarter_of_the_factors(fraction):
    usage = run_distributed(memory, 4, fraction)
    replicated = usage[0]["replicated_factors"]
    largest = max(u["factors"] for u in usage)
    assert largest <= 0.35 * replicated, (largest, replicated)
    assert sum(u["factors"] for u in usage) == replicated  # each factor held exactly once
    if fraction == 0.25:  # MEM-OPT: decompositions are not replicated either
        assert max(u["decompositions"] for u in usage) < 0.35 * sum(u["decompositions"] for u in usage)


def overlap_on_off(rank, world_size):
    results = []
    for overlap in (True, False):
        torch.manual_seed(0)
        model = SmallCNN()
        batches = cnn_batches(3, 8, torch.float32)
        pre, launched = _two_steps(
            rank,
            world_size,
            model,
            lambda s, r, batches=batches: (batches[s][0][4 * r : 4 * r + 4], torch.randn(4, 5)),
            overlap_factor_comm=overlap,
        )
        results.append((torch.cat([a.reshape(-1) for a, _ in pre.factors().values() if a is not None]), launched))
    return results


def test_overlapped_and_deferred_exchange_give_identical_factors():
    per_rank = run_distributed(overlap_on_off, 2)
    for (overlapped, launched_on), (deferred, launched_off) in per_rank:
        assert torch.equal(overlapped, deferred)
        assert launched_on[1] >= 1 and launched_off == [0, 0]


def invalid_fraction(rank, world_size):
    with pytest.raises(ValueError, match=r"grad_worker_fraction=0.3 .* Allowed here: 1/4, 2/4, 4/4"):
        KFACPreconditioner(SmallCNN(), grad_worker_fraction=0.3)
    return True


def test_fraction_that_does_not_divide_the_world_is_a_clear_error():
    assert run_distributed(invalid_fraction, 4) == [True] * 4
