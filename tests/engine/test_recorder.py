"""Hooks record only training forwards, can be removed, leak nothing, and survive layers that
are registered but never called as modules."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.models import MLP
from lightning_kfac.testing.oracles import capture_output_grads, damped_kronecker_solve, linear_factors, relative_error


def _backward(model: nn.Module, batch: int = 8) -> None:
    x = torch.randn(batch, 64)
    F.cross_entropy(model(x), torch.randint(0, 10, (batch,))).backward()


def _recorded(pre: KFACPreconditioner) -> bool:
    return pre.recorded_anything()


def test_eval_mode_forward_records_nothing():
    model = MLP()
    pre = KFACPreconditioner(model)
    model.eval()
    _backward(model)
    assert not _recorded(pre)
    pre.step(lr=0.1)
    assert all(a is None and g is None for a, g in pre.factors().values())


def test_no_grad_forward_records_nothing():
    model = MLP()
    pre = KFACPreconditioner(model)
    with torch.no_grad():
        model(torch.randn(4, 64))
    assert not _recorded(pre)
    _backward(model)
    assert _recorded(pre)


def test_recording_flag_switches_hooks_off():
    model = MLP()
    pre = KFACPreconditioner(model)
    pre.recording = False
    _backward(model)
    assert not _recorded(pre)


def test_remove_removes_every_hook_and_gradients_stay_plain():
    model = MLP()
    pre = KFACPreconditioner(model, kl_clip=None)
    _backward(model)
    pre.step()
    pre.remove()
    assert all(not m._forward_hooks for m in model.modules())
    model.zero_grad()
    _backward(model)
    grads = [p.grad.clone() for p in model.parameters()]
    assert not _recorded(pre)
    pre.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_discarded_preconditioner_is_collected_and_its_hooks_go():
    model = MLP()
    pre = KFACPreconditioner(model)
    ref = weakref.ref(pre)
    del pre
    gc.collect()
    assert ref() is None
    assert all(not m._forward_hooks for m in model.modules())


class TinyAttention(nn.Module):
    """MultiheadAttention (its out_proj is called functionally) and a Linear the model itself
    calls functionally (``F.linear`` with its weight): neither's hooks ever fire."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, num_heads=2, batch_first=True)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))
        return self.head(h.mean(1))


def _grad_matrix(layer: nn.Linear) -> torch.Tensor:
    """The layer's gradient as one (out, in+1) matrix V (the bias as the last column)."""
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()


def test_functional_layers_are_reported_and_keep_their_plain_gradient():
    torch.manual_seed(0)
    model = TinyAttention()
    pre = KFACPreconditioner(model, damping=0.01)
    # known from the start: MultiheadAttention always calls out_proj functionally
    assert "attn.out_proj" not in pre.layers
    assert any(s.name == "attn.out_proj" and "functionally" in s.reason for s in pre.skipped)
    assert "proj" in pre.layers  # registered: nothing tells yet that its hooks never fire
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 5, 8), torch.randint(0, 3, (16,))
    head_inputs: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda mod, args, output: head_inputs.append(args[0].detach().clone()))
    head_output_grads = capture_output_grads(model.head)
    losses, out_proj_plain, head_plain, head_first = [], [], None, None
    with pytest.warns(UserWarning, match=r"hooks of proj never fired") as record:
        for step in range(10):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            functional_grads = [_grad_matrix(model.attn.out_proj), _grad_matrix(model.proj)]
            if step == 0:
                head_plain = _grad_matrix(model.head)
            pre.step(lr=0.1)
            after = [_grad_matrix(model.attn.out_proj), _grad_matrix(model.proj)]
            out_proj_plain.append(all(torch.equal(a, b) for a, b in zip(after, functional_grads, strict=True)))
            if step == 0:
                head_first = _grad_matrix(model.head) / float(pre.last_kl_scale)
            optimizer.step()
            losses.append(loss.item())
    assert sum("never fired" in str(w.message) for w in record) == 1
    assert "proj" not in pre.layers and "attn.out_proj" not in pre.layers
    assert any(s.name == "proj" and "never fired" in s.reason for s in pre.skipped)
    assert losses[-1] < losses[0]
    # out_proj trains on its plain gradient at every step; the head is preconditioned: its first
    # step is the damped Kronecker solve (float32 factors: 1e-4; the plain gradient is ~1 away)
    assert all(out_proj_plain)
    a, g = linear_factors(head_inputs[0].double(), head_output_grads[0].double(), bias=True)
    expected = damped_kronecker_solve(a, g, head_plain.double(), 0.01, "factored")
    assert relative_error(head_first.double(), expected) < 1e-4
    assert relative_error(head_plain.double(), expected) > 0.5


def test_skip_layers_by_name_and_regex_and_unmatched_pattern_warns():
    model = MLP()
    with pytest.warns(UserWarning, match="nothing_here"):
        pre = KFACPreconditioner(model, skip_layers=["net.0", r"net\.[4]", "nothing_here"])
    assert list(pre.layers) == ["net.2"]
    assert {s.name for s in pre.skipped} == {"net.0", "net.4"}


def test_model_without_supported_layers_warns_and_passes_gradients_through():
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="no layer K-FAC can precondition"):
        pre = KFACPreconditioner(model)
    model(torch.randn(2, 4)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    pre.step(lr=0.1)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))
