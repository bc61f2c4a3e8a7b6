"""kfac_ddp with Lightning's features: gradient accumulation, mixed precision, clipping,
checkpoint/resume, evaluation loops, manual optimization, the lightning.pytorch namespace.

Every check compares against an independent computation: a plain torch loop driving
:class:`~lightning_kfac.KFACPreconditioner` on one big batch, an uninterrupted run, a 32-bit run,
a manual norm clip. One process in-process (``clean_process_group``); the multi-process and
multi-node checks live in ``test_multinode.py``.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACCallback, KFACDDPStrategy, KFACPreconditioner
from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.testing.lightning import (
    EvalProbe,
    SyntheticData,
    TinyNet,
    flat_params,
    running_factors,
    synthetic,
)
from tests.conftest import quiet_trainer

LR = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(strategy="kfac_ddp", callbacks=None, **kwargs) -> pl.Trainer:
    """One CPU process. Lightning always reshuffles the training data through a
    DistributedSampler under a DDP strategy; tests that need the data in order pass
    ``use_distributed_sampler=False`` with an unshuffled loader."""
    return quiet_trainer(**{"strategy": strategy, "callbacks": callbacks, "deterministic": True, **kwargs})


def kfac_callback(**overrides) -> KFACCallback:
    settings = dict(damping=1e-2, factor_update_freq=1, inv_update_freq=1, factor_decay=0.0, kl_clip=None)
    settings.update(overrides)
    return KFACCallback(**settings)


class Capture(TinyNet):
    """TinyNet that records, at its own on_before_optimizer_step (after the callbacks', so after
    K-FAC and before clipping), the gradients, the parameters and the running factors."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.grads: list[torch.Tensor] = []
        self.params_before: list[torch.Tensor] = []
        self.factors: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in self.parameters()]))
        self.params_before.append(flat_params(self))
        pre = self.trainer.strategy.preconditioner
        self.factors.append(running_factors(pre))


def reference_loop(batches, *, params=None, steps=None, clip=None, **kfac):
    """Plain torch: one KFACPreconditioner step per (big) batch, then SGD. Returns the
    preconditioned gradients, the final parameters and the last running factors."""
    model = TinyNet(lr=LR)
    if params is not None:
        torch.nn.utils.vector_to_parameters(params.clone(), model.parameters())
    settings = dict(damping=1e-2, factor_update_freq=1, inv_update_freq=1, factor_decay=0.0, kl_clip=None)
    settings.update(kfac)
    pre = KFACPreconditioner(model, lr=LR, **settings)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for x, y in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(lr=LR)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()]))
        opt.step()
    factors = running_factors(pre)
    pre.remove()
    return grads, flat_params(model), factors


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- gradient accumulation -------------------------------------------------------------------
def test_accumulated_micro_batches_give_the_update_of_one_big_batch(clean_process_group):
    """k=4 micro-batches of 8 == one batch of 32 (plain loop, separate code path), per step."""
    k, micro, steps = 4, 8, 3
    data = SyntheticData(batch_size=micro, n=k * micro * steps, shuffle=False)
    model = Capture(lr=LR)
    trainer = make_trainer(
        callbacks=[kfac_callback()], max_steps=steps, accumulate_grad_batches=k, use_distributed_sampler=False
    )
    trainer.fit(model, datamodule=data)

    full = synthetic(k * micro * steps)
    big = [(full.tensors[0][i * 32 : (i + 1) * 32], full.tensors[1][i * 32 : (i + 1) * 32]) for i in range(steps)]
    ref_grads, ref_params, _ = reference_loop(big)
    errors = [rel(g, r) for g, r in zip(model.grads, ref_grads, strict=True)]
    print("accumulation: relative error of the preconditioned update per step", errors)
    assert len(model.grads) == steps
    assert max(errors) <= 1e-5, errors
    assert rel(flat_params(model), ref_params) <= 1e-5
    # K-FAC stepped once per optimizer step, not once per micro-batch
    assert trainer.global_step == steps


def test_short_last_accumulation_window_gives_the_factors_of_its_own_batch(clean_process_group):
    """5 micro-batches with k=2 -> windows of 2, 2, 1: the last step's factors are those of one
    batch of 8 (its single micro-batch), not 1/2 of them."""
    micro = 8
    data = SyntheticData(batch_size=micro, n=5 * micro, shuffle=False)
    model = Capture(lr=LR)
    trainer = make_trainer(
        callbacks=[kfac_callback()], max_epochs=1, accumulate_grad_batches=2, use_distributed_sampler=False
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    x, y = synthetic(5 * micro).tensors
    last = [(x[4 * micro :], y[4 * micro :])]
    _, _, ref_factors = reference_loop(last, params=model.params_before[-1])
    for key, ref in ref_factors.items():
        assert rel(model.factors[-1][key], ref) <= 1e-5, key


# --- mixed precision -------------------------------------------------------------------------
def _fp16_plugin():
    # Lightning turns precision="16-mixed" on CPU into bf16-mixed; its MixedPrecision plugin with
    # a CPU GradScaler and CPU float16 autocast runs the real 16-mixed path (scale, unscale_,
    # skipped steps) on CPU
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))


PRECISION_STEPS = 30
_baseline: dict = {}


def _fit_losses(precision=None, plugins=None, callbacks=()):
    """Final full-data loss of a short run (same seed, data, K-FAC settings) under a precision."""
    pl.seed_everything(0, verbose=False)
    model = Capture(lr=0.2)
    kwargs = {"precision": precision} if precision else {}
    kfac = kfac_callback(kl_clip=1e-2, inv_update_freq=2, factor_decay=0.9)
    trainer = make_trainer(callbacks=[kfac, *callbacks], max_steps=PRECISION_STEPS, plugins=plugins, **kwargs)
    trainer.fit(model, datamodule=SyntheticData(batch_size=32, n=320))
    full = synthetic(320)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(full.tensors[0]), full.tensors[1]))
    return loss, model, trainer


def _baseline_32_bit():
    """The 32-bit run both precision tests compare with (computed once)."""
    if not _baseline:
        loss, model, _ = _fit_losses()
        _baseline.update(loss=loss, factors=model.factors[0])
    return _baseline


def test_16_mixed_unscales_G_and_trains_like_32_bit(clean_process_group):
    baseline = _baseline_32_bit()
    loss32 = baseline["loss"]
    loss16, model16, trainer = _fit_losses(plugins=[_fp16_plugin()])
    assert trainer.precision_plugin.scaler is not None
    ratio = loss16 / loss32
    print(f"16-mixed: final loss {loss16:.5f} vs 32-bit {loss32:.5f} (ratio {ratio:.4f})")
    assert abs(ratio - 1) <= 0.05
    # the first step's G (same parameters, same batch) matches 32-bit to fp16 accuracy; without
    # the unscaling it would be off by the loss scale squared (2**24)
    errors = {key: rel(model16.factors[0][key].float(), value) for key, value in baseline["factors"].items()}
    print(f"16-mixed: first-step factors vs 32-bit, worst relative error {max(errors.values()):.1e}")
    assert max(errors.values()) < 2e-2, errors


class Overflow(Capture):
    """Returns an infinite loss at one batch: the scaler finds inf gradients and skips."""

    bad_batch = 2

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.bad_batch else loss


def test_16_mixed_step_skipped_by_the_scaler_updates_no_factor(clean_process_group):
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pre = trainer.strategy.preconditioner
            seen[batch_idx] = {
                "factors": running_factors(pre),
                "steps": pre.steps,
                "params": flat_params(pl_module),
                "scale": trainer.precision_plugin.scaler.get_scale(),
            }

    model = Overflow(lr=LR)
    # factor_decay > 0: an update would move the running averages; inversions every step
    trainer = make_trainer(
        callbacks=[kfac_callback(factor_decay=0.5), Watch()],
        max_steps=5,
        plugins=[_fp16_plugin()],
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=SyntheticData(batch_size=16, n=160, shuffle=False))
    before, after = seen[Overflow.bad_batch], seen[Overflow.bad_batch + 1]
    assert after["scale"] == before["scale"] / 2  # the scaler did skip this step
    assert torch.equal(after["params"], before["params"])
    assert after["factors"].keys() == before["factors"].keys() and before["factors"]
    for key, value in before["factors"].items():
        assert torch.equal(after["factors"][key], value), key
    assert after["steps"] == before["steps"] + 1  # counted, so intervals stay on global_step
    assert trainer.strategy.discarded_steps == 1
    # and training went on with finite factors
    assert all(torch.isfinite(v).all() for v in model.factors[-1].values())
    assert not torch.equal(model.factors[-1]["net.0.A"], before["factors"]["net.0.A"])


def test_bf16_mixed_keeps_factors_and_decompositions_in_float32_and_trains_like_32_bit(clean_process_group):
    baseline = _baseline_32_bit()
    loss32 = baseline["loss"]
    dtypes = {}

    class Dtypes(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            pre = trainer.strategy.preconditioner
            for name, block in pre.blocks.items():
                for attr in ("running_a", "running_g", *block.decomposition_keys, *block.derived_keys):
                    value = getattr(block, attr)
                    if value is not None:
                        dtypes[f"{name}.{attr}"] = value.dtype

    loss16, model16, trainer = _fit_losses(precision="bf16-mixed", callbacks=[Dtypes()])
    assert trainer.precision == "bf16-mixed"
    ratio = loss16 / loss32
    print(f"bf16-mixed: final loss {loss16:.5f} vs 32-bit {loss32:.5f} (ratio {ratio:.4f})")
    assert abs(ratio - 1) <= 0.05
    block_class = KFACConfig().block_class
    per_layer = 2 + len(block_class.decomposition_keys) + len(block_class.derived_keys)
    assert len(dtypes) == 3 * per_layer and set(dtypes.values()) == {torch.float32}, dtypes
    # the first step's factors (same parameters, same batch) match 32-bit to bf16 accuracy
    # (measured: 2.5e-3 at worst)
    errors = {key: rel(model16.factors[0][key], value) for key, value in baseline["factors"].items()}
    print(f"bf16-mixed: first-step factors vs 32-bit, worst relative error {max(errors.values()):.1e}")
    assert max(errors.values()) < 2e-2, errors


# --- clipping ----------------------------------------------------------------------------------
def test_gradient_clip_val_clips_the_preconditioned_gradient(clean_process_group):
    steps, clip = 3, 0.05
    data = SyntheticData(batch_size=32, n=96, shuffle=False)
    model = Capture(lr=LR)
    trainer = make_trainer(
        callbacks=[kfac_callback()], max_steps=steps, gradient_clip_val=clip, use_distributed_sampler=False
    )
    trainer.fit(model, datamodule=data)
    x, y = synthetic(96).tensors
    batches = [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(steps)]
    # independent: precondition, then clip the preconditioned gradient by its norm, then SGD
    unclipped, _, _ = reference_loop(batches)
    _, ref_params, _ = reference_loop(batches, clip=clip)
    assert float(unclipped[0].norm()) > 5 * clip  # clipping was active
    err = float((flat_params(model) - ref_params).abs().max())
    print(f"clipping: max abs diff vs precondition-then-clip reference {err:.2e}")
    assert err <= 1e-6
    # the other order (clip the raw gradient, then precondition) is a different trajectory
    other = TinyNet(lr=LR)
    pre = KFACPreconditioner(other, lr=LR, damping=1e-2, inv_update_freq=1, factor_decay=0.0, kl_clip=None)
    opt = torch.optim.SGD(other.parameters(), lr=LR)
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(other(xb), yb).backward()
        torch.nn.utils.clip_grad_norm_(other.parameters(), clip)
        pre.step(lr=LR)
        opt.step()
    pre.remove()
    assert float((flat_params(other) - ref_params).abs().max()) > 100 * max(err, 1e-7)


# --- checkpoint and resume ---------------------------------------------------------------------
RESUME_KFAC = dict(damping=1e-2, factor_update_freq=2, inv_update_freq=3, factor_decay=0.9, kl_clip=1e-2)


def _resume_run(ckpt_dir, ckpt_path=None, epochs=3):
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    # a different initialisation than the uninterrupted run: everything must come from the checkpoint
    model = TinyNet(lr=LR, momentum=0.9, seed=0 if ckpt_path is None else 123)
    final = FinalStateProbe()
    trainer = make_trainer(
        callbacks=[
            KFACCallback(**RESUME_KFAC),
            ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1),
            final,
        ],
        max_epochs=epochs,
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=SyntheticData(batch_size=32, n=160), ckpt_path=ckpt_path)
    return flat_params(model), final.state


class FinalStateProbe(pl.Callback):
    state = None

    def on_train_end(self, trainer, pl_module):
        self.state = trainer.strategy.preconditioner.state_dict()


def test_resume_from_a_checkpoint_continues_exactly(tmp_path, clean_process_group):
    """float32, default K-FAC dtypes: 3 epochs of 5 steps uninterrupted vs 1 epoch, checkpoint,
    resume for 2 more. Step 5 updates no factor (factor_update_freq=2) and runs no inversion
    (inv_update_freq=3): the resumed run must use the restored factors and decompositions."""
    uninterrupted, state = _resume_run(tmp_path / "a")
    ckpt = tmp_path / "a" / "epoch=0-step=5.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # loadable with weights_only
    kfac = saved["kfac"]
    assert kfac["steps"] == 5 and kfac["hyperparameters"]["inv_update_freq"] == 3
    assert kfac["has_factors"] and kfac["has_inverse"]
    damping = kfac["inverse_damping"]  # one value, or one per layer
    assert all(v == pytest.approx(1e-2) for v in (damping.values() if isinstance(damping, dict) else [damping]))
    decomposed = {"running_a", "running_g", *KFACConfig().block_class.decomposition_keys}
    assert all(decomposed <= set(v) for v in kfac["layers"].values())
    assert any(key.startswith("KFACCallback") for key in saved["callbacks"])

    resumed, resumed_state = _resume_run(tmp_path / "b", ckpt_path=str(ckpt))
    diff = float((resumed - uninterrupted).abs().max())
    # control: the same resume from a checkpoint without the K-FAC state
    stripped = torch.load(ckpt, weights_only=False)
    del stripped["kfac"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    control, _ = _resume_run(tmp_path / "c", ckpt_path=str(tmp_path / "stripped.ckpt"))
    control_diff = float((control - uninterrupted).abs().max())
    print(f"resume: max abs parameter diff {diff:.2e} vs uninterrupted; without the K-FAC state {control_diff:.2e}")
    assert diff <= 1e-6
    assert control_diff > 1e-3
    assert resumed_state["steps"] == state["steps"] == 15
    for name, layer in state["layers"].items():
        for key, value in layer.items():
            assert float((resumed_state["layers"][name][key] - value).abs().max()) <= 1e-6, (name, key)


def test_a_checkpoint_loaded_for_validate_does_not_leak_into_a_later_fit(tmp_path, clean_process_group):
    _resume_run(tmp_path / "a", epochs=1)
    ckpt = str(tmp_path / "a" / "epoch=0-step=5.ckpt")
    trainer = make_trainer(max_steps=2, limit_val_batches=1)
    model = TinyNet()
    trainer.validate(model, datamodule=SyntheticData(), ckpt_path=ckpt)
    assert trainer.strategy._restored_kfac_state is None
    trainer.fit(model, datamodule=SyntheticData())
    assert trainer.global_step == 2


# --- evaluation loops --------------------------------------------------------------------------
def _eval_run(strategy):
    probe = EvalProbe()
    model = TinyNet(eval_in_train_mode=True)
    trainer = make_trainer(
        strategy=strategy,
        callbacks=[kfac_callback(), probe],
        max_steps=8,
        val_check_interval=3,  # validation mid-epoch too
        limit_val_batches=2,
        num_sanity_val_steps=2,
    )
    data = SyntheticData(batch_size=16, n=160)
    trainer.fit(model, datamodule=data)
    hooks = []

    class NoHooks(pl.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            hooks.append(sum(len(m._forward_hooks) for m in pl_module.modules()))

        on_predict_batch_start = on_test_batch_start

    trainer.callbacks.append(NoHooks())
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.test(model, datamodule=data, verbose=False)
    trainer.predict(model, datamodule=data)
    return probe, hooks


def test_evaluation_loops_record_no_factor_even_in_train_mode_with_autograd(clean_process_group):
    probe, hooks = _eval_run("kfac_ddp")
    assert probe.violations == []
    assert probe.eval_batches["sanity"] == 2 and probe.eval_batches["val"] >= 4
    assert probe.eval_batches["test"] > 0 and probe.eval_batches["predict"] > 0
    assert hooks and set(hooks) == {0}  # test/predict: no K-FAC hooks on the module at all


class _LeakyStrategy(KFACDDPStrategy):
    """Control: never switches recording off."""

    def _set_recording(self, value):
        pass


def test_evaluation_probe_detects_recording_when_it_is_not_switched_off(clean_process_group):
    probe, _ = _eval_run(_LeakyStrategy())
    assert any("factors recorded" in v for v in probe.violations)


# --- manual optimization -----------------------------------------------------------------------
def _three_steps_vs_reference(model, steps=3):
    data = SyntheticData(batch_size=32, n=96, shuffle=False)
    # max_epochs: a raw torch optimizer's steps do not advance Lightning's global_step
    trainer = make_trainer(callbacks=[kfac_callback()], max_steps=steps, max_epochs=1, use_distributed_sampler=False)
    trainer.fit(model, datamodule=data)
    x, y = synthetic(96).tensors
    batches = [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(steps)]
    _, ref_params, _ = reference_loop(batches)
    return float((flat_params(model) - ref_params).abs().max()), trainer


@pytest.mark.parametrize(
    "manual,explicit",
    [(True, False), (True, True), ("raw", True)],
    ids=["optimizer-step", "optimizer-step-after-explicit-call", "raw-optimizer-with-explicit-call"],
)
def test_manual_optimization_preconditions(manual, explicit, clean_process_group):
    diff, trainer = _three_steps_vs_reference(TinyNet(lr=LR, manual=manual, explicit_precondition=explicit))
    assert trainer.global_step == 3 or manual == "raw"
    print(f"manual optimization ({manual}, explicit={explicit}): max abs diff vs K-FAC reference {diff:.2e}")
    assert diff <= 1e-6


def test_an_extra_no_grad_forward_inside_training_step_records_nothing(clean_process_group):
    diff, _ = _three_steps_vs_reference(TinyNet(lr=LR, aux_forward=True))
    assert diff <= 1e-6


def test_manual_optimization_raw_step_without_preconditioning_is_an_error(clean_process_group):
    with pytest.raises(RuntimeError, match=r"precondition\(optimizer\)"):
        _three_steps_vs_reference(TinyNet(lr=LR, manual="raw"))


class _TwoOptimizers(TinyNet):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]


def test_several_optimizers_are_a_clear_error_at_fit_start(clean_process_group):
    trainer = make_trainer(max_steps=1)
    with pytest.raises(ValueError, match="kfac_ddp supports one optimizer; configure_optimizers returned 2"):
        trainer.fit(_TwoOptimizers(manual=True), datamodule=SyntheticData())


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inverse_method": "svd"}, "inverse_method.*eigen.*cholesky"),
        ({"grad_worker_fraction": 2.0}, "grad_worker_fraction"),
        ({"factor_dtype": "int8"}, "factor_dtype"),
        ({"kfac_bucket_cap_mb": -1}, "bucket_cap_mb"),
    ],
)
def test_bad_strategy_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KFACDDPStrategy(**kwargs)


# --- the lightning.pytorch namespace ------------------------------------------------------------
def test_lightning_pytorch_namespace(clean_process_group):
    L = pytest.importorskip("lightning.pytorch", reason="the `lightning` package is not installed")
    from lightning.pytorch.strategies import StrategyRegistry as LRegistry

    import lightning_kfac

    bound = lightning_kfac.lightning_pytorch
    assert LRegistry["kfac_ddp"]["strategy"] is bound.KFACDDPStrategy
    from lightning_kfac.lightning_pytorch import KFACCallback as LCallback  # importable by name

    assert issubclass(LCallback, L.Callback) and issubclass(LCallback, KFACCallback)

    class LNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = TinyNet(lr=LR)
            self.net = self.inner.net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR)

    x, y = synthetic(96).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    common = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    model = LNet()
    trainer = L.Trainer(
        strategy="kfac_ddp",
        callbacks=[
            bound.KFACCallback(damping=1e-2, inv_update_freq=1, factor_update_freq=1, factor_decay=0.0, kl_clip=None)
        ],
        **common,
    )
    assert isinstance(trainer.strategy, bound.KFACDDPStrategy)
    trainer.fit(model, loader)
    batches = [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(3)]
    _, ref_params, _ = reference_loop(batches)
    assert float((flat_params(model.net) - ref_params).abs().max()) <= 1e-6

    # the strategy adds the namespace's callback when there is none
    trainer = L.Trainer(strategy=bound.KFACDDPStrategy(), **common)
    trainer.fit(LNet(), loader)
    assert sum(isinstance(cb, bound.KFACCallback) for cb in trainer.callbacks) == 1
    # a strategy object of the other namespace is refused, and the error names the one that fits
    with pytest.raises(
        ValueError, match=r"in lightning\.pytorch's Trainer use lightning_kfac\.lightning_pytorch\.KFACDDPStrategy"
    ):
        L.Trainer(strategy=KFACDDPStrategy(), **common)
    with pytest.raises(ValueError, match=r"in pytorch_lightning's Trainer use lightning_kfac\.KFACDDPStrategy"):
        pl.Trainer(strategy=bound.KFACDDPStrategy(), **common)
