"""Bad input fails loudly; numerical faults never corrupt the K-FAC state nor stop training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.models import MLP, SmallCNN, cnn_batches
from lightning_kfac.testing.oracles import capture_output_grads, damped_kronecker_solve, linear_factors, relative_error

# --- bad input ---------------------------------------------------------------------------------
BAD_PRECONDITIONER_ARGS = [
    ({"damping": 0}, ValueError, r"damping must be a finite number > 0, got 0"),
    ({"damping": -1e-3}, ValueError, r"damping must be a finite number > 0, got -0.001"),
    ({"damping": float("nan")}, ValueError, r"damping must be a finite number > 0, got nan"),
    ({"damping": "0.1"}, TypeError, r"damping must be a positive real number, got '0.1'"),
    ({"factor_update_freq": 0}, ValueError, r"factor_update_freq must be an integer >= 1, got 0"),
    ({"factor_update_freq": 2.0}, TypeError, r"factor_update_freq must be an integer >= 1, got the float 2.0; write 2"),
    ({"inv_update_freq": -5}, ValueError, r"inv_update_freq must be an integer >= 1, got -5"),
    ({"inv_update_freq": 1.5}, TypeError, r"inv_update_freq must be an integer >= 1, got 1.5"),
    ({"inv_update_freq": True}, TypeError, r"inv_update_freq must be an integer >= 1, got True"),
    ({"factor_decay": 1.0}, ValueError, r"factor_decay must be in \[0, 1\), got 1.0"),
    ({"factor_decay": -0.1}, ValueError, r"factor_decay must be in \[0, 1\), got -0.1"),
    ({"kl_clip": 0}, ValueError, r"kl_clip must be a finite number > 0, got 0"),
    ({"kl_clip": -1.0}, ValueError, r"kl_clip must be a finite number > 0, got -1.0"),
    ({"inverse_method": "svd"}, ValueError, r"inverse_method must be one of 'eigen', 'cholesky'; got 'svd'"),
    ({"factor_dtype": "int32"}, ValueError, r"factor_dtype must be one of the float dtypes .*; got 'int32'"),
    ({"factor_dtype": torch.int64}, ValueError, r"factor_dtype must be one of the float dtypes .*; got torch.int64"),
    (
        {"inverse_dtype": torch.float16},
        ValueError,
        r"inverse_dtype must be one of the float dtypes float32, float64; got torch.float16",
    ),
    ({"comm_dtype": "float8"}, ValueError, r"comm_dtype must be one of the float dtypes .*; got 'float8'"),
    ({"grad_worker_fraction": 0}, ValueError, r"grad_worker_fraction must be in \(0, 1\], got 0.0"),
    ({"grad_worker_fraction": 1.5}, ValueError, r"grad_worker_fraction must be in \(0, 1\], got 1.5"),
    ({"assignment_cost": "flops"}, ValueError, r"assignment_cost must be one of 'compute', 'memory'; got 'flops'"),
    ({"bucket_cap_mb": 0}, ValueError, r"bucket_cap_mb must be a finite number > 0, got 0"),
    ({"skip_layers": ["fc("]}, ValueError, r"skip_layers entry 'fc\(' is not a valid regular expression"),
    ({"skip_layers": [3]}, TypeError, r"skip_layers must be a list of module names or regular expressions, got \[3\]"),
    (
        {"split_factors": True, "grad_worker_fraction": 0.5, "inverse_method": "eigen"},
        ValueError,
        r"split_factors=True needs grad_worker_fraction=1",
    ),
    (
        {"split_factors": True, "inverse_method": "cholesky"},
        ValueError,
        r"split_factors=True is only available with inverse_method='eigen'",
    ),
    ({"symmetric_comm": "yes"}, TypeError, r"symmetric_comm must be a bool, got 'yes'"),
    ({"lr_schedule": 0.1}, TypeError, r"unexpected keyword argument 'lr_schedule'.*options are: inverse_method"),
]


@pytest.mark.parametrize(
    "kwargs,error,message", BAD_PRECONDITIONER_ARGS, ids=[str(k) for k, _, _ in BAD_PRECONDITIONER_ARGS]
)
def test_bad_argument_is_named_with_its_value_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        KFACPreconditioner(MLP(), **kwargs)


def test_bad_hyperparameter_set_between_steps_is_rejected_and_keeps_the_old_value():
    pre = KFACPreconditioner(MLP(), damping=1e-3)
    with pytest.raises(ValueError, match="damping"):
        pre.damping = -1.0
    assert pre.damping == 1e-3


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got list"):
        KFACPreconditioner([nn.Linear(2, 2)])


def test_config_and_keywords_together_is_a_type_error():
    with pytest.raises(TypeError, match="either config or its fields"):
        KFACPreconditioner(MLP(), config=KFACConfig(), inverse_method="eigen")


# --- numerical faults --------------------------------------------------------------------------
def _step(model, pre, x, y, optimizer=None):
    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    if optimizer is not None:
        optimizer.step()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _factor_error(actual: dict, expected: dict) -> float:
    """The largest relative error over the (A, G) of every layer of two ``pre.factors()``."""
    assert actual.keys() == expected.keys()
    return max(relative_error(a, e) for name in expected for a, e in zip(actual[name], expected[name], strict=True))


def _grad_matrix(layer: nn.Linear) -> torch.Tensor:
    """The layer's gradient as one (out, in+1) matrix V (the bias as the last column)."""
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()


def _clean_run(seed: int):
    """The control of the NaN tests: their MLP run without the bad batch (one step without the
    optimizer, then 3 SGD steps); its final parameters and factors."""
    torch.manual_seed(seed)
    model = MLP()
    pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=1, factor_update_freq=1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    _step(model, pre, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _step(model, pre, x, y, optimizer)
    return _flat(model), pre.factors()


def test_nan_activations_drop_that_update_warn_once_and_training_continues():
    torch.manual_seed(0)
    model = MLP()
    pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=1, factor_update_freq=1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    _step(model, pre, x, y)
    before = {name: (a.clone(), g.clone()) for name, (a, g) in pre.factors().items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"non-finite factor statistics in layer 'net\.0'"):
        _step(model, pre, bad, y)
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, before[name][0]) and torch.equal(g, before[name][1]), name
    assert pre.nonfinite_factor_updates >= 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _step(model, pre, x, y, optimizer)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(a).all() and torch.isfinite(g).all() for a, g in pre.factors().values())
    # control: the same run without the bad batch ends in the same place (the NaN left no trace)
    control_params, control_factors = _clean_run(0)
    assert relative_error(_flat(model), control_params) <= 1e-12
    assert _factor_error(pre.factors(), control_factors) <= 1e-12
    assert _factor_error(pre.factors(), before) > 1e-3  # the 3 later steps did update the factors


def test_nan_on_the_very_first_update_leaves_factors_uninitialised_then_recovers():
    torch.manual_seed(1)
    model = MLP()
    pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=1, factor_update_freq=1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with pytest.warns(UserWarning, match="non-finite"):
        _step(model, pre, torch.full_like(x, float("inf")), y)
    _step(model, pre, x, y)  # the first finite update initialises the running factors
    assert all(torch.isfinite(a).all() and torch.isfinite(g).all() for a, g in pre.factors().values())
    # control: a run that never saw the bad batch. The first finite update replaced the factors
    # (no average with anything the inf batch left) and preconditioned the same gradients
    torch.manual_seed(1)
    control_model = MLP()
    control = KFACPreconditioner(control_model, lr=0.1, inv_update_freq=1, factor_update_freq=1)
    _step(control_model, control, x, y)
    assert _factor_error(pre.factors(), control.factors()) <= 1e-12
    for p, c in zip(model.parameters(), control_model.parameters(), strict=True):
        assert relative_error(p.grad, c.grad) <= 1e-12
    # and the rest of the run goes as in the control
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _step(model, pre, x, y, optimizer)
    control_params, control_factors = _clean_run(1)
    assert relative_error(_flat(model), control_params) <= 1e-12
    assert _factor_error(pre.factors(), control_factors) <= 1e-12


def test_failed_decomposition_keeps_the_last_good_one(monkeypatch):
    torch.manual_seed(2)
    model = MLP()
    pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=1, kl_clip=None, inverse_method="eigen")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    _step(model, pre, x, y)
    good = {name: block.q_a.clone() for name, block in pre.blocks.items()}
    good_factors = {name: (a.double(), g.double()) for name, (a, g) in pre.factors().items()}

    def broken_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = {name: _grad_matrix(model.get_submodule(name)) for name in good}
    pre.step()
    assert pre.decomposition_failures == 2 * len(good)  # A and G of every layer, after a float64 retry
    for name, block in pre.blocks.items():
        assert torch.equal(block.q_a, good[name])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the gradients went through the kept decomposition: the damped Kronecker solve with the
    # factors it was computed from (float32: 1e-4), not the plain gradient (~1 away)
    for name, (a, g) in good_factors.items():
        expected = damped_kronecker_solve(a, g, plain[name].double(), pre.damping, "factored")
        assert relative_error(_grad_matrix(model.get_submodule(name)).double(), expected) < 1e-4, name
        assert relative_error(plain[name].double(), expected) > 0.5, name


def test_layer_that_never_had_a_decomposition_falls_back_to_its_plain_gradient(monkeypatch):
    torch.manual_seed(3)
    model = MLP()
    pre = KFACPreconditioner(model, inv_update_freq=1, kl_clip=None, inverse_method="cholesky")
    monkeypatch.setattr(torch.linalg, "cholesky", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x")))
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    pre.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters(), strict=True))
    assert pre.decomposition_failures == 3


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
@pytest.mark.parametrize("batch,scale", [(2, 1.0), (8, 1e-8), (8, 1e8), (1, 1e4)])
def test_rank_deficient_and_extreme_scales_stay_finite(method, batch, scale):
    torch.manual_seed(4)
    model = MLP((64, 128, 128, 10))  # batch << width: rank-deficient factors
    # a small damping, so that the factors' rank deficiency and scale shape the step
    pre = KFACPreconditioner(model, lr=0.05, inv_update_freq=1, inverse_method=method, damping=1e-3, kl_clip=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    head = model.net[4]
    head_inputs: list[torch.Tensor] = []
    head.register_forward_hook(lambda mod, args, output: head_inputs.append(args[0].detach().clone()))
    head_output_grads = capture_output_grads(head)
    for step in range(4):
        x, y = torch.randn(batch, 64) * scale, torch.randint(0, 10, (batch,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 0:
            plain = _grad_matrix(head).double()
        pre.step()
        if step == 0:
            first = _grad_matrix(head).double() / float(pre.last_kl_scale)
        optimizer.step()
    loss = F.cross_entropy(model(torch.randn(16, 64) * scale), torch.randint(0, 10, (16,)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(loss)
    # finite and right: the head's first step is the damped solve with its rank-deficient factors
    # from the recorded rows (factored damping), to within float32
    # accuracy at these condition numbers (5%; the plain gradient is at least 50% away)
    a, g = linear_factors(head_inputs[0].double(), head_output_grads[0].double(), bias=True)
    expected = damped_kronecker_solve(a, g, plain, pre.damping, "factored")
    assert relative_error(first, expected) < 0.05
    assert relative_error(plain, expected) > 0.5


def _half_precision_run(dtype, compute_dtype, kfac: bool = True):
    """SmallCNN initialised and fed in ``dtype``, trained in ``compute_dtype`` for 6 steps: the
    model, its preconditioner, the losses and the parameter update (final - initial, float32)."""
    torch.manual_seed(5)
    model = SmallCNN().to(dtype).to(compute_dtype)
    initial = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    pre = KFACPreconditioner(model, lr=0.05, inv_update_freq=2, damping=0.01) if kfac else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for x, y in cnn_batches(6, 16, dtype):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x.to(compute_dtype)).float(), y)
        loss.backward()
        if pre is not None:
            pre.step()
        optimizer.step()
        losses.append(loss.item())
    update = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]) - initial
    return model, pre, losses, update


# relative error of the 6-step parameter update against the float32 run (float16 rounds to 11
# bits, bfloat16 to 8: updates of ~1e-3 on weights of ~0.3 lose a few percent per step)
HALF_PRECISION_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_train_with_float32_factors(dtype):
    model, pre, losses, update = _half_precision_run(dtype, dtype)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert pre.factors()["fc1"][0].dtype == torch.float32
    # the same run in float32 (same initial weights and inputs) makes nearly the same update; the
    # run without K-FAC (control) is far from it, so the tolerance does tell K-FAC steps apart
    _, _, _, update32 = _half_precision_run(dtype, torch.float32)
    _, _, _, update_sgd = _half_precision_run(dtype, torch.float32, kfac=False)
    tolerance = HALF_PRECISION_TOLERANCE[dtype]
    assert relative_error(update, update32) < tolerance
    assert relative_error(update_sgd, update32) > 2 * tolerance


# --- property: the step is the damped Kronecker solve ---------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 7),
    n_out=st.integers(1, 6),
    batch=st.integers(1, 9),
    bias=st.booleans(),
    damping=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**16),
    method_and_mode=st.sampled_from([("eigen", "exact"), ("eigen", "factored"), ("cholesky", "factored")]),
)
def test_property_step_equals_explicit_kronecker_solve(n_in, n_out, batch, bias, damping, seed, method_and_mode):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).double()
    method, mode = method_and_mode
    pre = KFACPreconditioner(
        layer, damping=damping, kl_clip=None, factor_dtype=torch.float64, inverse_dtype=torch.float64,
        inverse_method=method, damping_mode=mode,
    )  # fmt: skip
    x = torch.randn(batch, n_in, dtype=torch.float64)
    target = torch.randn(batch, n_out, dtype=torch.float64)
    y = layer(x)
    (0.5 * ((y - target) ** 2).sum(1).mean()).backward()
    a = torch.cat([x, torch.ones(batch, 1, dtype=torch.float64)], 1) if bias else x
    g = (y - target).detach()
    big_a, big_g = a.T @ a / batch, g.T @ g / batch
    v = layer.weight.grad.clone()
    if bias:
        v = torch.cat([v, layer.bias.grad[:, None]], 1)
    pre.step()
    out = layer.weight.grad if not bias else torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    expected = damped_kronecker_solve(big_a, big_g, v, damping, mode)
    assert float((out - expected).norm()) <= 1e-7 * max(1.0, float(expected.norm()))


# --- determinism ---------------------------------------------------------------------------------
def _train_twice(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmallCNN()
        net = DistributedDataParallel(model)
        pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in cnn_batches(4, 8, torch.float32):
            optimizer.zero_grad()
            F.cross_entropy(net(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]).backward()
            pre.step()
            optimizer.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return results


def test_two_runs_with_the_same_seed_are_bitwise_identical():
    first, second = run_distributed(_train_twice, 2)[0]
    assert torch.equal(first, second)
