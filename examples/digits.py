"""scikit-learn's 8x8 digits (ships with scikit-learn, no download) as a LightningDataModule, and a
small MLP classifier whose optimizer is chosen by name. Used by the demo, the tests and the
``examples/configs/digits_mlp.yaml`` config. Evaluation is exact on any number of processes: the
evaluation loaders do not repeat samples, and accuracy and loss are torchmetrics metrics (see
``fashion_mnist.eval_sampler`` for the reasons)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(pl.LightningDataModule):
    """1797 images of 64 pixels, standardised; a fixed 1297 / 500 train / test split."""

    def __init__(self, batch_size: int = 64, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        x, y = x[order], y[order]
        x_train, y_train, x_test, y_test = x[:1297], y[:1297], x[1297:], y[1297:]
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-3)
        self.train_set = TensorDataset((x_train - mean) / std, y_train)
        self.test_set = TensorDataset((x_test - mean) / std, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def _eval_loader(self) -> DataLoader:
        """The test images in order; with several processes each evaluates its own share, without
        the repeated samples Lightning's default ``DistributedSampler`` would pad it with."""
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = UnrepeatedDistributedSampler(self.test_set, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.test_set, batch_size=250, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()


class DigitsClassifier(pl.LightningModule):
    """64-hidden-hidden-10 MLP. ``optimizer``: ``"sgd"`` (momentum) or ``"adamw"``; K-FAC comes
    from the strategy, not from here, so the same module trains with either. Logs ``train_loss``,
    ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``, torchmetrics metrics of the same names
    (the losses weighted by batch size), exact over all processes."""

    def __init__(
        self,
        hidden: int = 64,
        lr: float = 0.05,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        )
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss, accuracy = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        accuracy.update(logits, y)
        # the metric objects: computed over all batches and processes at the end of the epoch
        self.log(f"{stage}_loss", loss)
        self.log(f"{stage}_acc", accuracy)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {hp.optimizer!r}")
