"""Layer kinds beyond (B, in) Linear and Conv2d, each against an explicit computation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.models import SmallCNN
from lightning_kfac.testing.oracles import damped_kronecker_solve, linear_factors


@pytest.fixture(autouse=True)
def _float64_default(float64_default):
    """Every test here runs with float64 as the default dtype."""


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _capture_output_grads(module: nn.Module) -> list[torch.Tensor]:
    grads: list[torch.Tensor] = []

    def forward_hook(mod, inputs, output):
        output.register_hook(lambda g: grads.append(g.detach().clone()))

    module.register_forward_hook(forward_hook)
    return grads


def _capture_inputs(module: nn.Module) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, args, output: inputs.append(args[0].detach().clone()))
    return inputs


def _weight_and_bias_grad(layer: nn.Linear) -> torch.Tensor:
    """The layer's gradient as one (out, in+1) matrix V (the bias as the last column)."""
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()


def _pre(module, **kwargs):
    kwargs.setdefault("kl_clip", None)
    return KFACPreconditioner(module, factor_dtype=torch.float64, inverse_dtype=torch.float64, **kwargs)


# --- Linear on sequences -----------------------------------------------------------------------
def test_linear_on_sequences_counts_every_position():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    pre = _pre(layer, damping=0.02, inv_update_freq=1)  # cholesky, factored damping
    grads = _capture_output_grads(layer)
    batch, length = 4, 6
    x = torch.randn(batch, length, 5)
    (layer(x).sin().sum() / batch).backward()
    v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()
    pre.step()
    a_rows = torch.cat([x.reshape(-1, 5), torch.ones(batch * length, 1)], 1)
    gy = grads[0].reshape(-1, 3)
    expected_a = a_rows.T @ a_rows / (batch * length)  # mean over B*T rows
    expected_g = batch * gy.T @ gy  # B * sum over B*T rows
    running_a, running_g = pre.factors()[""]
    assert _rel(running_a, expected_a) < 1e-12 and _rel(running_g, expected_g) < 1e-12
    out = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    assert _rel(out, damped_kronecker_solve(expected_a, expected_g, v, 0.02, "factored")) < 1e-5


# --- Conv1d / Conv3d ---------------------------------------------------------------------------
def _conv_factors_by_loops(conv, x, gy):
    """Explicit per-position patches for 1D and 3D convolutions (zero padding)."""
    n = len(conv.kernel_size)
    pad = [p for p in reversed(conv.padding) for _ in range(2)]
    xp = F.pad(x, pad)
    batch = x.shape[0]
    out_shape = gy.shape[2:]
    rows_a, rows_g = [], []
    for b in range(batch):
        for pos in _positions(out_shape):
            slices = tuple(
                slice(p * s, p * s + d * (k - 1) + 1, d)
                for p, s, d, k in zip(pos, conv.stride, conv.dilation, conv.kernel_size, strict=True)
            )
            patch = xp[(b, slice(None), *slices)].reshape(-1)
            if conv.bias is not None:
                patch = torch.cat([patch, torch.ones(1)])
            rows_a.append(patch)
            rows_g.append(gy[(b, slice(None), *pos)])
    a, g = torch.stack(rows_a), torch.stack(rows_g)
    assert n in (1, 3)
    return a.T @ a / a.shape[0], batch * g.T @ g


def _positions(shape):
    import itertools

    return itertools.product(*(range(s) for s in shape))


@pytest.mark.parametrize(
    "conv,shape",
    [
        (lambda: nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1), (3, 2, 9)),
        (lambda: nn.Conv1d(2, 3, kernel_size=2, stride=1, padding=2, dilation=2, bias=False), (2, 2, 7)),
        (
            lambda: nn.Conv3d(2, 3, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
            (2, 2, 4, 5, 5),
        ),
    ],
)
def test_conv1d_and_conv3d_factors_equal_per_position_loops(conv, shape):
    torch.manual_seed(1)
    conv = conv()
    pre = _pre(conv)
    grads = _capture_output_grads(conv)
    x = torch.randn(*shape)
    (conv(x).tanh().sum() / shape[0]).backward()
    pre.step()
    expected_a, expected_g = _conv_factors_by_loops(conv, x, grads[0])
    running_a, running_g = pre.factors()[""]
    assert _rel(running_a, expected_a) < 1e-12
    assert _rel(running_g, expected_g) < 1e-12


def test_grouped_convolution_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    pre = KFACPreconditioner(model)
    assert list(pre.layers) == ["2"]
    assert any(s.name == "0" and "groups=2" in s.reason for s in pre.skipped)


# --- Embedding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,mode", [("eigen", "exact"), ("eigen", "factored"), ("cholesky", "factored")])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_diagonal_a_and_step_equal_explicit_solve(method, mode, padding_idx):
    torch.manual_seed(2)
    vocab, dim, batch, length = 7, 4, 3, 5
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    damping = 0.05
    pre = _pre(emb, damping=damping, inv_update_freq=1, inverse_method=method, damping_mode=mode)
    grads = _capture_output_grads(emb)
    tokens = torch.randint(0, vocab, (batch, length))
    tokens[0, :2] = 0
    (emb(tokens).sin().sum() / batch).backward()
    v = emb.weight.grad.T.clone()  # (dim, vocab): out x in
    pre.step()
    keep = (
        tokens.reshape(-1) != padding_idx if padding_idx is not None else torch.ones(batch * length, dtype=torch.bool)
    )
    counts = torch.bincount(tokens.reshape(-1)[keep], minlength=vocab).double()
    expected_a = counts / keep.sum()
    gy = grads[0].reshape(-1, dim)[keep]
    expected_g = batch * gy.T @ gy
    running_a, running_g = pre.factors()[""]
    assert running_a.shape == (vocab,)  # a vector, never vocab x vocab
    assert _rel(running_a, expected_a) < 1e-12 and _rel(running_g, expected_g) < 1e-12
    expected = damped_kronecker_solve(expected_a, expected_g, v, damping, mode)
    assert _rel(emb.weight.grad.T, expected) < 1e-5


def test_sparse_embedding_is_skipped():
    pre = KFACPreconditioner(nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Linear(2, 2)))
    assert list(pre.layers) == ["1"] and "sparse" in pre.skipped[0].reason


# --- shared weights ----------------------------------------------------------------------------
def test_module_called_twice_accumulates_both_calls():
    torch.manual_seed(3)
    layer = nn.Linear(4, 4)
    pre = _pre(layer)
    grads = _capture_output_grads(layer)
    batch = 5
    x = torch.randn(batch, 4)
    h = layer(x)
    out = layer(torch.tanh(h))  # weight tying / unrolling: the same module twice
    (out.pow(2).sum() / batch).backward()
    pre.step()
    inputs = [x, torch.tanh(h).detach()]
    rows = torch.cat([torch.cat([i, torch.ones(batch, 1)], 1) for i in inputs])
    expected_a = rows.T @ rows / rows.shape[0]  # mean over the rows of every call
    expected_g = batch * sum(g.T @ g for g in grads)  # per-sample sum over every call
    running_a, running_g = pre.factors()[""]
    assert _rel(running_a, expected_a) < 1e-12 and _rel(running_g, expected_g) < 1e-12


# --- transformers --------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, dim=16, length=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.position))


def test_transformer_encoder_preconditions_module_calls_and_reports_the_rest():
    torch.manual_seed(4)
    model = TinyTransformer()
    # batch 8: the small-batch KL clip of the README's guidance (the default 0.1 oscillates here)
    pre = KFACPreconditioner(model, damping=0.01, lr=0.05, kl_clip=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tokens = torch.randint(0, 11, (8, 6))
    # independent record of the first step of a (B, T, in) sequence layer and of the head
    checked = {name: model.get_submodule(name) for name in ("encoder.layers.0.linear1", "head")}
    inputs = {name: _capture_inputs(layer) for name, layer in checked.items()}
    output_grads = {name: _capture_output_grads(layer) for name, layer in checked.items()}
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(15):
            optimizer.zero_grad()
            logits = model(tokens[:, :-1].repeat(1, 2)[:, :6])
            loss = F.cross_entropy(logits.reshape(-1, 11), tokens.roll(-1, 1).reshape(-1))
            loss.backward()
            if step == 0:
                plain = {name: _weight_and_bias_grad(layer) for name, layer in checked.items()}
            pre.step()
            if step == 0:
                first = {name: _weight_and_bias_grad(layer) for name, layer in checked.items()}
                kl_scale = float(pre.last_kl_scale)
            optimizer.step()
            losses.append(loss.item())
    expected = {"embed", "head"} | {f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert set(pre.layers) == expected
    # out_proj is called functionally by the attention: known at registration, so it is reported
    # in the summary and no "never fired" warning comes later
    out_projs = {f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)}
    assert {s.name: "MultiheadAttention" in s.reason for s in pre.skipped} == dict.fromkeys(out_projs, True)
    assert not any("never fired" in str(w.message) for w in caught)
    first_order = set(pre.first_order_parameters())
    assert "position" in first_order and "encoder.layers.0.self_attn.in_proj_weight" in first_order
    assert "encoder.layers.0.norm1.weight" in first_order and "head.weight" not in first_order
    assert losses[-1] < 0.7 * losses[0]
    # the first step is the damped Kronecker solve with factors from the recorded rows (float32
    # factors: 1e-4; the plain gradient is ~1 away), times the KL-clip scale
    for name in checked:
        a, g = linear_factors(inputs[name][0], output_grads[name][0], bias=True)
        expected = damped_kronecker_solve(a, g, plain[name], 0.01, "factored")
        assert _rel(first[name] / kl_scale, expected) < 1e-4, name
        assert _rel(plain[name], expected) > 0.5, name


# --- compile, memory formats, dtypes --------------------------------------------------------------
def _train_cnn(model_fn, steps=4, compile_model=False, channels_last=False, dtype=torch.float64):
    torch.manual_seed(5)
    model = SmallCNN().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pre = KFACPreconditioner(model, damping=0.01, lr=0.1, inv_update_freq=2)
    net = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=generator).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        pre.step()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), pre


def test_torch_compile_trains_like_eager():
    eager, _ = _train_cnn(None, dtype=torch.float32)
    compiled, pre = _train_cnn(None, compile_model=True, dtype=torch.float32)
    assert len(pre.layers) == 5 and not pre.skipped
    assert _rel(compiled, eager) < 1e-4


def test_channels_last_matches_contiguous():
    contiguous, _ = _train_cnn(None)
    channels_last, _ = _train_cnn(None, channels_last=True)
    assert _rel(channels_last, contiguous) < 1e-10


def test_float64_model_with_float32_factors_trains():
    torch.manual_seed(6)
    model = SmallCNN().double()
    pre = KFACPreconditioner(model, lr=0.1)  # factors and decompositions in float32
    inputs, output_grads = _capture_inputs(model.fc1), _capture_output_grads(model.fc1)
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()
    plain = _weight_and_bias_grad(model.fc1)
    pre.step()
    assert all(p.grad.dtype == torch.float64 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert pre.factors()["fc1"][0].dtype == torch.float32
    # the step is the float64 damped Kronecker solve up to float32 rounding of the factors
    a, g = linear_factors(inputs[0], output_grads[0], bias=True)
    expected = damped_kronecker_solve(a, g, plain, pre.damping, "factored")
    assert _rel(_weight_and_bias_grad(model.fc1) / float(pre.last_kl_scale), expected) < 1e-4
    assert _rel(plain, expected) > 0.5
