"""Checkpoint states: a state written by an earlier version keeps loading and gives the step that
version computed (a fixture file written by the version-1 code, with that code's next step)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine import state as schema
from lightning_kfac.engine.staleness import StalenessConfig
from lightning_kfac.testing.oracles import damped_kronecker_solve, relative_error

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "kfac_state_v1.pt")


class FixtureNet(nn.Module):
    """The model the fixture was written with: Embedding, Conv1d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 7, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)
        return self.fc(torch.tanh(self.conv(h)).flatten(1))


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_a_version_1_state_loads_and_the_next_step_is_the_one_that_version_computed(method):
    saved = torch.load(FIXTURE, weights_only=True)[method]
    assert saved["state"]["version"] == 1 and "layer_meta" not in saved["state"]
    model = FixtureNet().double()
    model.load_state_dict(saved["params"])
    # version 1 damped the eigen method exactly (its only mode)
    mode = "exact" if method == "eigen" else "factored"
    pre = KFACPreconditioner(
        model, kl_clip=None, inverse_method=method, damping_mode=mode,
        factor_dtype=torch.float64, inverse_dtype=torch.float64,
    )  # fmt: skip
    if method == "eigen":  # the fixture's run used adaptive intervals: their state comes back too
        pre.staleness = StalenessConfig(threshold=0.1, min_interval=1, max_interval=8, probe_after=2)
    pre.load_state_dict(saved["state"])
    assert pre.steps == 4 and set(pre.plan.a_owner) == {"embed", "conv", "fc"}
    x, y = saved["next_batch"]
    F.cross_entropy(model(x), y).backward()
    pre.step()
    for name, param in model.named_parameters():
        assert relative_error(param.grad, saved["next_grads"][name]) <= 1e-10, name


def test_migration_infers_the_counters_of_a_version_1_state():
    saved = torch.load(FIXTURE, weights_only=True)["eigen"]["state"]
    pre = KFACPreconditioner(
        FixtureNet().double(), inverse_method="eigen", factor_dtype=torch.float64, inverse_dtype=torch.float64
    )
    migrated = schema.migrate(saved, pre.blocks)
    assert migrated["version"] == schema.STATE_VERSION and saved["version"] == 1  # the input is left as it was
    for name in ("embed", "conv", "fc"):
        meta = migrated["layer_meta"][name]
        assert meta["a_updates"] == meta["g_updates"] == meta["inversions"] == 1
    assert migrated["layer_meta"]["embed"]["decomposed_with_bias"] is None  # no bias
    assert migrated["layer_meta"]["fc"]["decomposed_with_bias"] is True


def test_an_unknown_version_is_refused_naming_the_versions_read():
    pre = KFACPreconditioner(FixtureNet())
    with pytest.raises(ValueError, match=r"versions \(1, 2\).*version 99"):
        pre.load_state_dict({"version": 99, "layers": {}})


def test_another_damping_mode_on_load_is_said_once_and_takes_effect():
    # version 1 damped the eigen method exactly; loaded into factored damping, the decompositions
    # are kept and the next step is the factored one (the explicit solve with the saved factors)
    saved = torch.load(FIXTURE, weights_only=True)["eigen"]
    model = FixtureNet().double()
    model.load_state_dict(saved["params"])
    pre = KFACPreconditioner(
        model, kl_clip=None, inverse_method="eigen", damping_mode="factored",
        factor_dtype=torch.float64, inverse_dtype=torch.float64,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"saved with damping_mode='exact'.*uses 'factored'"):
        pre.load_state_dict(saved["state"])
    pre.factor_update_freq = pre.inv_update_freq = 1000  # the next step uses the loaded decompositions
    block = pre.blocks["fc"]  # the factors as they were decomposed: Q diag(d) Q^T
    a = block.q_a @ torch.diag(block.d_a) @ block.q_a.T
    g = block.q_g @ torch.diag(block.d_g) @ block.q_g.T
    x, y = saved["next_batch"]
    F.cross_entropy(model(x), y).backward()
    plain = torch.cat([model.fc.weight.grad, model.fc.bias.grad[:, None]], 1).clone()
    pre.step()
    expected = damped_kronecker_solve(a, g, plain, pre.damping, "factored")
    assert relative_error(torch.cat([model.fc.weight.grad, model.fc.bias.grad[:, None]], 1), expected) <= 1e-8
