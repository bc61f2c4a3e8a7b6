"""The Lightning CLI: ``lightning-kfac`` (console script), ``python -m lightning_kfac``, plain
``LightningCLI`` with ``class_path: lightning_kfac.KFACDDPStrategy``, and the shipped configs."""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import lightning_kfac
from lightning_kfac.cli import run_cli
from tests.conftest import ROOT, script_env

CONFIGS = os.path.join(ROOT, "examples", "configs")


pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = os.path.join(CONFIGS, "digits_mlp.yaml")
FASHION = os.path.join(CONFIGS, "fashion_mnist_cnn.yaml")
FASHION_DATA = "/usr/share/datasets/fashion-mnist"
CONSOLE_SCRIPT = shutil.which("lightning-kfac", path=os.path.dirname(sys.executable))

# a few steps, no validation, quiet; the checkpoint at the end is what the tests read
QUICK = [
    "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def _checkpoint(root) -> dict:
    paths = [
        p for p in glob.glob(os.path.join(str(root), "**", "*.ckpt"), recursive=True) if not p.endswith("last.ckpt")
    ]
    assert len(paths) == 1, paths
    return torch.load(paths[0], weights_only=True)


def _assert_kfac_ran(ckpt: dict, steps: int) -> None:
    assert ckpt["global_step"] == steps
    assert ckpt["kfac"]["steps"] == steps and ckpt["kfac"]["has_inverse"]
    assert ckpt["kfac"]["layers"]  # factors of every preconditioned layer


def test_console_script_runs_the_digits_config_on_two_processes(tmp_path):
    if CONSOLE_SCRIPT is None:
        pytest.skip("the lightning-kfac console script is not installed (pip install -e .)")
    cmd = [CONSOLE_SCRIPT, "fit", "--config", DIGITS, *QUICK, f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr or "Starting with 2 processes" in proc.stdout + proc.stderr
    _assert_kfac_ran(_checkpoint(tmp_path), 3)


def test_python_dash_m_runs_the_digits_config(tmp_path, monkeypatch, clean_process_group):
    """``python -m lightning_kfac`` (its __main__, in-process: one device, nothing re-executed)."""
    argv = [
        "lightning_kfac",
        "fit",
        "--config",
        DIGITS,
        *QUICK,
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    runpy.run_module("lightning_kfac", run_name="__main__", alter_sys=False)
    _assert_kfac_ran(_checkpoint(tmp_path), 3)


def test_plain_lightning_cli_with_class_path(tmp_path, monkeypatch, clean_process_group):
    """Plain ``pytorch_lightning.cli.LightningCLI`` (not lightning-kfac's): the strategy comes in
    by class_path with init_args, replacing the config's ``kfac_ddp`` string."""
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)
    override = tmp_path / "strategy.yaml"
    override.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_kfac.KFACDDPStrategy\n"
        "    init_args:\n      inverse_method: cholesky\n      grad_worker_fraction: 1.0\n  devices: 1\n"
    )
    args = ["fit", "--config", DIGITS, "--config", str(override), *QUICK, f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(args=args, save_config_kwargs={"overwrite": True})
    assert type(cli.trainer.strategy) is lightning_kfac.KFACDDPStrategy
    assert cli.trainer.strategy.kfac_config.inverse_method == "cholesky"
    _assert_kfac_ran(_checkpoint(tmp_path), 3)


@pytest.mark.skipif(
    not os.path.isdir(FASHION_DATA),
    reason=f"Fashion-MNIST not installed at {FASHION_DATA} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_cnn_config_parses_and_runs(tmp_path, monkeypatch, clean_process_group):
    monkeypatch.chdir(ROOT)
    cli = run_cli(
        [
            "fit",
            "--config",
            FASHION,
            *QUICK,
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.trainer.strategy, lightning_kfac.KFACDDPStrategy)
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_kfac.KFACCallback))
    assert callback.hyperparameters(0)["inv_update_freq"] == 100
    ckpt = _checkpoint(tmp_path)
    _assert_kfac_ran(ckpt, 3)
    assert {"net.0", "net.3", "net.7", "net.9"} <= set(ckpt["kfac"]["layers"])  # two convs, two linears


def test_configs_parse_with_the_strategy_string_and_class_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for config, strategy in ((DIGITS, "kfac_ddp"), (FASHION, None)):
        cli = run_cli(["--config", config, f"--trainer.default_root_dir={tmp_path}"], run=False)
        if strategy is not None:
            assert cli.config["trainer"]["strategy"] == strategy
        assert isinstance(cli.trainer.strategy, lightning_kfac.KFACDDPStrategy)


def test_bad_strategy_option_in_a_config_names_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n"
        "  strategy:\n"
        "    class_path: lightning_kfac.KFACDDPStrategy\n"
        "    init_args:\n"
        "      inverse_method: svd\n"
    )
    with pytest.raises(ValueError, match=r"inverse_method.*'eigen'.*'cholesky'"):
        run_cli(["--config", DIGITS, "--config", str(bad)], run=False)
