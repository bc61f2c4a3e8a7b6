"""The README's code runs as printed: every ``python`` block in a fresh process (after a prelude
that supplies the names a snippet leaves to the reader: ``model``, ``loader``, ``optimizer``, and
that shortens any Trainer to 3 steps on one CPU), every ``yaml`` block as a LightningCLI config
added to the digits example's, and the demo that ``make demo`` runs, shortened to one epoch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_env

README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# what a snippet leaves to the reader, and a Trainer that stops after 3 steps on one CPU process
PRELUDE = """
import warnings
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
torch.manual_seed(0)
_data = TensorDataset(torch.randn(256, 64), torch.randint(0, 10, (256,)))
loader = DataLoader(_data, batch_size=64, shuffle=True)


class _Model(pytorch_lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)

    def train_dataloader(self):
        return loader


model = _Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
_Trainer = pytorch_lightning.Trainer


class _QuickTrainer(_Trainer):
    def __init__(self, *args, **kwargs):
        kwargs.update(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
        super().__init__(*args, **kwargs)


pytorch_lightning.Trainer = _QuickTrainer
"""
CHECKS = """
_trainers = [v for v in list(globals().values()) if isinstance(v, _Trainer)]
assert all(t.global_step == 3 for t in _trainers if t.state.finished), [t.global_step for t in _trainers]
print("README block ran")
"""


def readme_blocks(language: str) -> list[str]:
    with open(README) as f:
        return [body for lang, body in FENCE.findall(f.read()) if lang == language]


PYTHON_BLOCKS = readme_blocks("python")
YAML_BLOCKS = readme_blocks("yaml")


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON_BLOCKS) >= 3 and YAML_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(PRELUDE + "\n" + PYTHON_BLOCKS[index] + "\n" + CHECKS)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"block {index}:\n{PYTHON_BLOCKS[index]}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    )
    assert "README block ran" in result.stdout


@pytest.mark.parametrize("index", range(len(YAML_BLOCKS)))
def test_yaml_block_is_a_config_the_cli_trains_with(index, tmp_path):
    config = tmp_path / "readme.yaml"
    config.write_text(YAML_BLOCKS[index])
    command = [
        sys.executable, "-m", "lightning_kfac", "fit", "--config", "examples/configs/digits_mlp.yaml",
        "--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=3",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{YAML_BLOCKS[index]}\n{result.stderr[-4000:]}"


def test_the_demo_prints_both_accuracies():
    # make demo runs examples/digits_demo.py (2 CPU processes); one epoch here
    result = subprocess.run(
        [sys.executable, "examples/digits_demo.py", "--epochs", "1"],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    accuracies = re.findall(r"test accuracy: (\d\.\d+)", result.stdout)
    assert len(accuracies) == 2 and all(0.5 < float(a) <= 1.0 for a in accuracies), result.stdout


def test_the_fit_start_summary_shown_is_the_one_printed():
    import torch
    from torch import nn

    from lightning_kfac import KFACPreconditioner
    from lightning_kfac.engine import hyperparameters
    from lightning_kfac.engine.report import fit_summary

    class TransformerNet(nn.Module):  # the model the README's example describes
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(10, 16)
            self.pos = nn.Parameter(torch.zeros(8, 16))
            self.encoder = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.encoder(self.embed(x) + self.pos))

    model = TransformerNet()
    printed = fit_summary(KFACPreconditioner(model), dict(hyperparameters.DEFAULTS))
    shown = next(block for block in readme_blocks("") if block.startswith("K-FAC: "))
    assert shown.rstrip("\n") == printed
