"""The engine under real training patterns, one process: frozen biases, layers that sit out
steps, layers frozen at the start and unfrozen later, resumed states that lack a layer,
float16 factors under loss scaling, states of another shape, diagonal (Embedding) factors in the
reports. Every check is against an explicit computation (factors from the inputs and output
gradients, a ``torch.kron`` solve), never against the engine itself.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine.report import estimated_memory, fit_summary, layer_statistics
from lightning_kfac.testing.oracles import (
    capture_output_grads,
    damped_kronecker_solve,
    linear_factors,
    relative_error,
)


@pytest.fixture(autouse=True)
def _float64_default(float64_default):
    """Every test here runs with float64 as the default dtype."""


def _pre(model: nn.Module, **kwargs) -> KFACPreconditioner:
    settings = dict(
        damping=0.01, inv_update_freq=1, kl_clip=None, factor_dtype=torch.float64, inverse_dtype=torch.float64
    )
    settings.update(kwargs)
    return KFACPreconditioner(model, **settings)


# --- item 2: a frozen bias with a trainable weight -----------------------------------------------
@pytest.mark.parametrize("method,damping_mode", [("eigen", "exact"), ("cholesky", "factored")])
def test_frozen_bias_gets_no_gradient_and_the_weight_is_preconditioned_as_a_bias_free_layer(method, damping_mode):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    layer.bias.requires_grad_(False)
    bias_before = layer.bias.detach().clone()
    pre = _pre(layer, inverse_method=method, damping_mode=damping_mode, damping=0.05)
    grads = capture_output_grads(layer)
    x = torch.randn(9, 5)
    (layer(x).sin().sum() / 9).backward()
    v = layer.weight.grad.clone()
    pre.step()
    assert layer.bias.grad is None  # K-FAC wrote nothing into the frozen bias
    # weight alone is a K-FAC layer without the ones column: A from x, G from the output gradient
    a, g = linear_factors(x, grads[0], bias=False)
    expected = damped_kronecker_solve(a, g, v, 0.05, damping_mode)
    assert relative_error(layer.weight.grad, expected) <= 1e-8
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert torch.equal(layer.bias, bias_before)


# --- item 3: a layer that sees no input on some steps ---------------------------------------------
class TrunkWithAuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.head(h).square().mean()
        if use_aux:
            out = out + self.aux(h).sin().mean()
        return out


def test_a_layer_unused_for_60_steps_keeps_its_factors_and_updates_them_when_used_again():
    torch.manual_seed(1)
    model = TrunkWithAuxHead()
    decay = 0.95
    pre = _pre(model, factor_decay=decay, inv_update_freq=10, factor_update_freq=1)
    grads = capture_output_grads(model.aux)
    inputs = capture_inputs(model.aux)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(use_aux: bool) -> None:
        optimizer.zero_grad()
        model(torch.randn(7, 6), use_aux).backward()
        pre.step()
        optimizer.step()

    step(True)
    first = linear_factors(inputs[-1], grads[-1], bias=True)
    held = [f.clone() for f in pre.factors()["aux"]]
    assert all(relative_error(h, e) <= 1e-12 for h, e in zip(held, first, strict=True))
    for _ in range(60):
        step(False)
    running_a, running_g = pre.factors()["aux"]
    # untouched: no averaging with zeros while the layer sits out
    assert torch.equal(running_a, held[0]) and torch.equal(running_g, held[1])
    step(True)
    latest = linear_factors(inputs[-1], grads[-1], bias=True)
    running_a, running_g = pre.factors()["aux"]
    assert relative_error(running_a, decay * first[0] + (1 - decay) * latest[0]) <= 1e-12
    assert relative_error(running_g, decay * first[1] + (1 - decay) * latest[1]) <= 1e-12


def capture_inputs(module: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


# --- item 4: frozen at the start, unfrozen later; a layer new to a resumed run --------------------
def test_a_layer_frozen_at_the_start_is_preconditioned_from_its_first_training_step():
    torch.manual_seed(2)
    model = TrunkWithAuxHead()
    model.trunk.requires_grad_(False)
    pre = _pre(model, damping=0.02)
    assert "trunk" in pre.layers  # registered whatever its requires_grad
    grads, inputs = capture_output_grads(model.trunk), capture_inputs(model.trunk)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(7, 6), False).backward()
        pre.step()
    assert model.trunk.weight.grad is None and pre.factors()["trunk"] == (None, None)
    model.trunk.requires_grad_(True)
    model.zero_grad()
    model(torch.randn(7, 6), False).backward()
    v = torch.cat([model.trunk.weight.grad, model.trunk.bias.grad[:, None]], 1).clone()
    pre.step()
    a, g = linear_factors(inputs[-1], grads[-1], bias=True)
    out = torch.cat([model.trunk.weight.grad, model.trunk.bias.grad[:, None]], 1)
    assert relative_error(out, damped_kronecker_solve(a, g, v, 0.02, "factored")) <= 1e-8


def test_a_layer_missing_from_a_loaded_state_starts_afresh_with_one_warning():
    torch.manual_seed(3)
    model = TrunkWithAuxHead()
    model.aux.requires_grad_(False)
    pre = _pre(model)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(7, 6), True).backward()
        pre.step()
    state = pre.state_dict()
    assert set(state["layers"]) == {"trunk", "head"}
    pre.remove()

    model.aux.requires_grad_(True)
    resumed = _pre(model)
    grads, inputs = capture_output_grads(model.aux), capture_inputs(model.aux)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(state)
        resumed.build_plan_from_state()
        model.zero_grad()
        model(torch.randn(7, 6), True).backward()
        v = torch.cat([model.aux.weight.grad, model.aux.bias.grad[:, None]], 1).clone()
        resumed.step()
    messages = [str(w.message) for w in caught]
    assert sum("aux" in m and "afresh" in m for m in messages) == 1, messages
    assert not any("never fired" in m for m in messages), messages
    a, g = linear_factors(inputs[-1], grads[-1], bias=True)
    out = torch.cat([model.aux.weight.grad, model.aux.bias.grad[:, None]], 1)
    assert relative_error(out, damped_kronecker_solve(a, g, v, 0.01, "factored")) <= 1e-8


# --- item 6: float16 factors under loss scaling ----------------------------------------------------
def test_float16_factors_work_with_the_default_loss_scale():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(4)
    layer = nn.Linear(16, 8)
    pre = KFACPreconditioner(layer, factor_dtype=torch.float16, kl_clip=None, inv_update_freq=1)
    grads = capture_output_grads(layer)
    x = torch.randn(32, 16)
    scale = 2.0**16  # torch.amp.GradScaler's initial scale
    (layer(x).sin().mean() * scale).backward()
    pre.step(grad_scale=scale)
    a, g = linear_factors(x.double(), grads[0].double() / scale, bias=True)
    running_a, running_g = pre.factors()[""]
    assert pre.nonfinite_factor_updates == 0
    assert running_g.dtype == torch.float16
    assert relative_error(running_a.double(), a) <= 2e-3
    assert relative_error(running_g.double(), g) <= 2e-3


# --- item 7: a state of another shape is refused when loaded ---------------------------------------
def test_a_state_with_other_shapes_is_refused_at_load_naming_layer_factor_and_shapes():
    small, large = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(5, 3))
    pre = _pre(small)
    small(torch.randn(6, 4)).sum().backward()
    pre.step()
    state = pre.state_dict()
    other = _pre(large)
    with pytest.raises(ValueError, match=r"layer '0'.*A.*\(5, 5\).*\(6, 6\)|layer '0'.*A.*\(6, 6\).*\(5, 5\)"):
        other.load_state_dict(state)


# --- item 8: diagonal (Embedding) factors in the summary, the estimate and the diagnostics --------
class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(self.embed(tokens).transpose(1, 2)))
        return self.head(h.mean(-1))


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_summary_estimate_and_diagnostics_agree_with_the_held_factors_for_every_layer_kind(method):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(5)
    model = EmbeddingModel()
    pre = KFACPreconditioner(model, inverse_method=method, kl_clip=None, inv_update_freq=1)
    tokens, labels = torch.randint(0, 100, (12, 9)), torch.randint(0, 4, (12,))
    F.cross_entropy(model(tokens), labels).backward()
    pre.step()
    summary = fit_summary(pre)
    assert "100x100" not in summary and "100 (diagonal)" in summary
    held = pre.memory_usage()
    estimate = estimated_memory(pre, pre.plan)[0]
    assert estimate["factors"] == held["factors"]
    assert estimate["decompositions"] == held["decompositions"]
    stats = layer_statistics(pre)
    running_a, running_g = pre.factors()["embed"]
    assert running_a.dim() == 1
    assert math.isclose(stats["embed"]["trace_A"], float(running_a.double().sum()), rel_tol=1e-9)
    assert math.isclose(stats["embed"]["trace_G"], float(running_g.double().trace()), rel_tol=1e-9)
    assert all(math.isfinite(stats[name]["cond"]) and stats[name]["cond"] >= 1.0 for name in ("embed", "conv", "head"))


# --- item 9: results independent of the intra-op thread count a launcher picks ---------------------
@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_a_step_is_bitwise_the_same_under_one_and_two_intra_op_threads(method):
    """Launchers give a rank 1 or 2 threads depending on the node layout (Lightning: CPUs per
    local process; torchrun: 1 only with several processes per node). CPU eigh, Cholesky and a
    long dot product round differently with the thread count; K-FAC pins them. The model's own
    forward and backward run with one thread in both runs: only K-FAC's step sees the change."""
    torch.set_default_dtype(torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(1)
            torch.manual_seed(6)
            model = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 10))
            pre = KFACPreconditioner(
                model, inverse_method=method, inv_update_freq=1, kl_clip=1e-3, lr=0.1, damping=1e-3
            )
            F.cross_entropy(model(torch.randn(400, 300)), torch.randint(0, 10, (400,))).backward()
            torch.set_num_threads(count)
            pre.step()
            results.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
