"""Two gloo ranks under real training patterns: a layer called a data-dependent number of times
per step (with the overlapped factor exchange on), a branch that only some ranks take, a layer
that only one rank uses on the first step. Oracles: one process on the same global batch, or the
factors computed by hand from the rank's own inputs and output gradients."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.oracles import capture_output_grads, linear_factors, relative_error

GLOBAL_BATCH = 8
SETTINGS = dict(
    damping=0.01,
    inv_update_freq=1,
    factor_update_freq=1,
    kl_clip=None,
    factor_dtype=torch.float64,
    inverse_dtype=torch.float64,
)


def _batches(steps: int, features: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(GLOBAL_BATCH, features, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(steps)
    ]


def _local(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    size = GLOBAL_BATCH // world_size
    return tensor[rank * size : (rank + 1) * size]


def _full_factors(pre: KFACPreconditioner) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's running (A, G), gathered from their owners (collective)."""
    layers = pre.state_dict()["layers"]
    return {name: (saved["running_a"], saved["running_g"]) for name, saved in layers.items()}


# --- item 1: a layer called a data-dependent number of times per step -----------------------------
class Unrolled(nn.Module):
    """An input layer, a cell applied ``calls`` times (an unrolled RNN), a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.cell = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, calls: int) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(calls):
            h = torch.tanh(self.cell(h))
        return self.head(h)


CALLS = (3, 5, 2, 5)  # learnt from the first step: 3; then more, fewer, more


def _train_unrolled(rank: int, world_size: int):
    model = Unrolled().double()
    net = DistributedDataParallel(model) if world_size > 1 else model
    pre = KFACPreconditioner(model, factor_decay=0.5, **SETTINGS)  # overlap_factor_comm on (default)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    factors = []
    for calls, (x, y) in zip(CALLS, _batches(len(CALLS), 4, 3), strict=True):
        optimizer.zero_grad()
        F.cross_entropy(net(_local(x, rank, world_size), calls), _local(y, rank, world_size)).backward()
        pre.step()
        optimizer.step()
        factors.append(_full_factors(pre))
    return factors, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_layer_called_a_variable_number_of_times_gets_exact_factors_with_the_overlapped_exchange():
    one_factors, one_params = _train_unrolled(0, 1)
    for factors, params in run_distributed(_train_unrolled, 2):
        for step, (got, expected) in enumerate(zip(factors, one_factors, strict=True)):
            for name in expected:
                for which, g, e in zip("AG", got[name], expected[name], strict=True):
                    error = relative_error(g, e)
                    assert error <= 1e-10, f"step {step} ({CALLS[step]} calls) {name} {which}: {error:.2e}"
        assert relative_error(params, one_params) <= 1e-10


# --- items 3 and 4: a branch some ranks do not take -----------------------------------------------
class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.branch = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.head(h)
        return out + self.branch(h) if use_branch else out


def _train_branches(rank: int, world_size: int, uses_branch):
    """``uses_branch(rank, step)``: whether this rank takes the branch at that step. Returns, per
    step, the gathered factors, this rank's own branch input and output gradient (or None), the
    branch's gradient before and after K-FAC, and the warnings."""
    model = Branches().double()
    net = DistributedDataParallel(model, find_unused_parameters=True)
    grads = capture_output_grads(model.branch)
    inputs: list[torch.Tensor] = []
    model.branch.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().clone()))
    pre = KFACPreconditioner(model, factor_decay=0.0, **SETTINGS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(_batches(3, 6, 3, seed=2)):
            optimizer.zero_grad()
            used = uses_branch(rank, step)
            seen = len(grads)
            F.cross_entropy(net(_local(x, rank, world_size), used), _local(y, rank, world_size)).backward()
            plain = model.branch.weight.grad.clone()
            pre.step()
            own = (inputs[-1], grads[-1]) if len(grads) > seen else None
            steps.append(
                {"factors": _full_factors(pre), "own": own, "plain": plain, "kfac": model.branch.weight.grad.clone()}
            )
            optimizer.step()
    return {"steps": steps, "warnings": [str(w.message) for w in caught], "layers": list(pre.layers)}


def _only_rank0(rank: int, step: int) -> bool:
    return rank == 0


def test_a_branch_taken_by_one_rank_gets_that_ranks_factors_not_half_of_them():
    results = run_distributed(_train_branches, 2, _only_rank0)
    for step, record in enumerate(results[0]["steps"]):
        x, gy = record["own"]
        expected_a, expected_g = linear_factors(x, gy, bias=True)
        for result in results:  # the same gathered state on both ranks
            running_a, running_g = result["steps"][step]["factors"]["branch"]
            assert relative_error(running_a, expected_a) <= 1e-10, step
            assert relative_error(running_g, expected_g) <= 1e-10, step


def _rank1_first(rank: int, step: int) -> bool:
    return rank == 1 or step > 0


def test_a_layer_only_one_rank_uses_on_the_first_step_is_kept_and_preconditioned_on_every_rank():
    results = run_distributed(_train_branches, 2, _rank1_first)
    x, gy = results[1]["steps"][0]["own"]
    expected_a, expected_g = linear_factors(x, gy, bias=True)
    for result in results:
        assert "branch" in result["layers"]
        assert not any("never fired" in message for message in result["warnings"]), result["warnings"]
        running_a, running_g = result["steps"][0]["factors"]["branch"]
        assert relative_error(running_a, expected_a) <= 1e-10
        assert relative_error(running_g, expected_g) <= 1e-10
        for record in result["steps"]:  # preconditioned from the first step on
            assert relative_error(record["kfac"], record["plain"]) > 1e-3
    for a, b in zip(results[0]["steps"], results[1]["steps"], strict=True):
        assert torch.equal(a["kfac"], b["kfac"])
