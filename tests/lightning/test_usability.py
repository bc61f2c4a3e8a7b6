"""What a Lightning user meets first: amortised K-FAC times in the logs, a fit-start summary that
is true from the first step, the strategy aliases Lightning users expect, the CLI with either
Lightning namespace, errors that name the fix, and small things (an integer in the progress bar,
warnings at the user's line)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import StrategyRegistry
from torch import nn

from lightning_kfac import KFACCallback
from lightning_kfac.strategy import STRATEGY_ALIASES
from lightning_kfac.testing.lightning import SyntheticData, TinyNet, quiet_trainer
from tests.conftest import ROOT, script_env

pytestmark = pytest.mark.usefixtures("one_thread", "clean_process_group")


class Totals(Callback):
    """After KFACCallback: the engine's running totals at every optimizer step."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, dict[str, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pre = trainer.strategy.preconditioner
        self.seen[trainer.global_step - 1] = (pre.steps, dict(pre.timing_totals_ms))


def test_logged_times_are_means_per_step_since_the_previous_log(tmp_path):
    totals = Totals()
    callback = KFACCallback(inv_update_freq=4, kl_clip=None)
    trainer = quiet_trainer(
        strategy="kfac_ddp",
        callbacks=[callback, totals],
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=3,
        max_steps=9,
    )
    trainer.fit(TinyNet(), datamodule=SyntheticData(batch_size=16))
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "metrics.csv"), recursive=True)
    import csv

    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kfac/time_inverse_ms")]
    assert [int(r["step"]) for r in rows] == [2, 5, 8]
    previous = (0, dict.fromkeys(totals.seen[0][1], 0.0))
    for row in rows:
        steps, now = totals.seen[int(row["step"])]
        for part in ("hooks", "factors", "inverse", "precondition", "total"):
            mean = (now[part] - previous[1][part]) / (steps - previous[0])
            assert float(row[f"kfac/time_{part}_ms"]) == pytest.approx(mean, rel=1e-6, abs=1e-9), part
        previous = (steps, now)
    # inversions at steps 0, 4, 8: every window holds one, so each amortised inverse time is > 0
    assert all(float(r["kfac/time_inverse_ms"]) > 0 for r in rows)


class TransformerNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.pos = nn.Parameter(torch.zeros(1, 1, 16))
        self.out = nn.Linear(16, 4)
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x).unsqueeze(1) + self.pos)
        return self.out(h[:, 0])


def test_the_fit_start_summary_is_true_from_the_first_step_and_compact():
    callback = KFACCallback(inv_update_freq=2)
    model = TransformerNet()
    trainer = quiet_trainer(strategy="kfac_ddp", callbacks=[callback], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=SyntheticData(batch_size=16))
    text = callback.summary_text
    lines = text.splitlines()
    assert max(len(line) for line in lines[:2]) <= 100
    assert "COMM-OPT" not in text and "owner" not in text  # one process: nothing to distribute
    listed = {line.split()[0] for line in lines if line.startswith("  ") and "Linear" in line and ":" not in line}
    assert listed == {"embed", "encoder.linear1", "encoder.linear2", "out"}
    assert "encoder.self_attn.out_proj" in text.split("left out (plain gradient):")[1]
    first_order = text.split("first-order")[1]
    assert "encoder.self_attn.in_proj_weight" in first_order and "pos" in first_order
    assert "normalisation (LayerNorm): encoder.norm1.weight" in first_order
    assert not any("never fired" in str(w.message) for w in caught)  # nothing dropped later


def test_a_damping_that_dwarfs_the_factors_is_reported_once():
    from lightning_kfac import KFACPreconditioner
    from lightning_kfac.testing.models import MLP

    for damping, expected in ((1e6, 1), (1e-3, 0)):
        torch.manual_seed(0)
        model = MLP((8, 6, 3))
        pre = KFACPreconditioner(model, damping=damping, kl_clip=None, inv_update_freq=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
                pre.step()
        messages = [str(w.message) for w in caught if "exceeds every Kronecker eigenvalue" in str(w.message)]
        assert len(messages) == expected, (damping, messages)
        if expected:
            assert "SGD with the learning rate divided by 1e+06" in messages[0]
            # at the user's line, not in torch's decorator
            (record,) = [w for w in caught if "exceeds" in str(w.message)]
            assert record.filename == __file__


def test_the_strategy_aliases_are_registered_with_their_ddp_settings():
    for name, keywords in STRATEGY_ALIASES.items():
        assert name in StrategyRegistry
        assert StrategyRegistry[name]["init_params"] == keywords


def test_find_unused_parameters_true_trains_a_model_with_an_unused_branch():
    class Unused(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(10, 4)  # never called: DDP must be told

    trainer = quiet_trainer(strategy="kfac_ddp_find_unused_parameters_true", max_steps=3)
    trainer.fit(Unused(), datamodule=SyntheticData(batch_size=16))
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert trainer.global_step == 3


def _fit_digits(tmp_path, strategy: str) -> dict:
    out = tmp_path / strategy
    out.mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "tests", "scripts", "fit_digits.py"), "--out", str(out)]
    cmd += ["--strategy", strategy, "--devices", "2", "--max-steps", "8"]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "rank0.pt")


def test_spawn_and_notebook_aliases_train_like_the_popen_launcher(tmp_path):
    reference = _fit_digits(tmp_path, "kfac_ddp")
    for alias in ("kfac_ddp_spawn", "kfac_ddp_notebook"):
        result = _fit_digits(tmp_path, alias)
        assert result["metrics"]["kfac/inversions"] > 0, alias
        assert torch.equal(result["params"], reference["params"]), alias


@pytest.mark.parametrize(
    "class_path,namespace",
    [("l_namespace.LModel", "lightning.pytorch"), ("lightning_kfac.testing.lightning.TinyNet", "pytorch_lightning")],
)
def test_the_cli_runs_modules_of_either_lightning_namespace(tmp_path, class_path, namespace):
    data = "l_namespace.LData" if namespace == "lightning.pytorch" else "lightning_kfac.testing.lightning.SyntheticData"
    config = {
        "model": {"class_path": class_path},
        "data": {"class_path": data},
        "trainer": {"strategy": "kfac_ddp", "accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "lightning_kfac", "fit", "--config", str(path)]
    cwd = os.path.join(ROOT, "tests", "scripts")
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "K-FAC:" in proc.stdout + proc.stderr  # the fit-start summary: kfac_ddp ran
    helped = subprocess.run([sys.executable, "-m", "lightning_kfac", "--help"], cwd=cwd, env=script_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "lightning.pytorch" in helped.stdout and "pytorch_lightning" in helped.stdout


def test_two_kfac_callbacks_are_refused_naming_the_callback():
    # given to the Trainer, Lightning refuses them at construction, naming the class
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `KFACCallback`"):
        quiet_trainer(strategy="kfac_ddp", callbacks=[KFACCallback(), KFACCallback()], max_steps=1)
    # added afterwards, K-FAC refuses them at fit start
    trainer = quiet_trainer(strategy="kfac_ddp", callbacks=[KFACCallback()], max_steps=1)
    trainer.callbacks.append(KFACCallback())
    with pytest.raises(ValueError, match="2 KFACCallbacks: use one"):
        trainer.fit(TinyNet(), datamodule=SyntheticData(batch_size=16))


def test_the_progress_bar_shows_the_inversion_step_as_an_integer():
    trainer = quiet_trainer(strategy="kfac_ddp", callbacks=[KFACCallback(inv_update_freq=3)], max_steps=5)
    trainer.fit(TinyNet(), datamodule=SyntheticData(batch_size=16))
    value = trainer.progress_bar_metrics["kfac_inv"]
    assert value == 3 and isinstance(value, int)


def test_a_kfac_callback_of_either_namespace_works_in_a_lightning_pytorch_trainer():
    L = pytest.importorskip("lightning.pytorch")
    import lightning_kfac.lightning_pytorch as lkp

    for callback in (KFACCallback(inv_update_freq=2), lkp.KFACCallback(inv_update_freq=2)):
        trainer = L.Trainer(strategy="kfac_ddp", callbacks=[callback], max_steps=3, accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
        from l_namespace import LData, LModel

        trainer.fit(LModel(), datamodule=LData())
        assert callback.inversions == 2, type(callback)
    assert isinstance(pl.Trainer, type)
