"""Fashion-MNIST (60k train / 10k test, 28x28 grey images, 10 classes) as a LightningDataModule,
and an MLP or small CNN classifier whose optimizer is chosen by name. Used by the benchmarks
(``benchmarks/run.py``, tasks 1 and 2) and the ``examples/configs`` Fashion-MNIST configs.

The data comes from the Debian package ``dataset-fashion-mnist`` (IDX files, gzipped or not,
under ``/usr/share/datasets/fashion-mnist``); nothing is downloaded::

    apt-get install dataset-fashion-mnist        # or pass data_dir=... to a folder with the IDX files

K-FAC comes from the strategy (``Trainer(strategy="kfac_ddp")``), not from the module, so the same
module trains with K-FAC, SGD-momentum or AdamW.

Evaluation is exact on any number of processes: the validation and test loaders split the data
over the processes without repeating samples (:func:`eval_sampler`), and accuracy and loss are
torchmetrics metrics, which sum their counts over the batches and the processes.
"""

from __future__ import annotations

import gzip
import os
import struct

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# pixel statistics of the 60k training images (after scaling to [0, 1])
MEAN, STD = 0.2860, 0.3530
# IDX type codes (the third byte of the magic number) -> torch dtype; the data is big-endian
_IDX_DTYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


def find_idx_file(data_dir: str, name: str) -> str:
    """The path of IDX file ``name`` in ``data_dir``, plain or ``.gz``; FileNotFoundError (saying
    how to get the files) when neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {data_dir!r}. Install the Debian package "
        f"(`apt-get install dataset-fashion-mnist`, files under {DEFAULT_DATA_DIR}) or pass "
        f"data_dir= a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)."
    )


def read_idx(path: str) -> torch.Tensor:
    """Read one IDX file (plain or gzipped) into a tensor of its stored dtype and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = bytearray(raw[4 + 4 * ndim :])
    data = torch.frombuffer(body, dtype=torch.uint8)
    if dtype != torch.uint8:
        itemsize = torch.empty((), dtype=dtype).element_size()
        data = data.view(-1, itemsize).flip(-1).contiguous().view(dtype)  # big- to little-endian
    count = 1
    for size in shape:
        count *= size
    if data.numel() != count:
        raise ValueError(f"{path}: header says shape {shape}, body holds {data.numel()} values")
    return data.reshape(shape)


def write_idx(path: str, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped when ``path`` ends in ``.gz``); used by tests
    to make small stand-ins for the real files."""
    tensor = tensor.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def load_split(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` ``"train"`` or ``"test"``: (images as float (N, 1, 28, 28) standardised, labels long (N,))."""
    images = read_idx(find_idx_file(data_dir, FILES[f"{split}_images"]))
    labels = read_idx(find_idx_file(data_dir, FILES[f"{split}_labels"]))
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(
            f"{data_dir}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match"
        )
    x = (images.float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return x, labels.long()


def eval_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """The sampler of an evaluation (validation / test) loader: with several processes, this
    process's share of ``dataset`` (samples ``rank``, ``rank + world_size``, ...), so that every
    sample is evaluated exactly once; ``None`` (in order, everything) in one process or without a
    trainer.

    Left alone, Lightning gives an evaluation loader a ``DistributedSampler``, which pads the data
    with repeats of its first samples until every process has as many, so those samples count
    twice in the metrics (Lightning warns about it for ``validate``/``test``, not for validation
    during ``fit``). Lightning's ``UnrepeatedDistributedSampler`` (the one it uses for ``predict``)
    does not pad: the shares differ by at most one sample, so one process may run one batch more.
    It is a ``DistributedSampler``, so Lightning keeps it instead of inserting its own.

    The evaluation step must then meet two conditions. No communication per batch, since the
    processes may run different numbers of batches: log torchmetrics objects, which synchronise
    once, in ``compute()`` at the end of the epoch; no ``on_step=True`` with ``sync_dist=True``,
    no collective in ``validation_step``. And no ``self.log(tensor, sync_dist=True)`` epoch means:
    Lightning averages the processes' sample counts in integer arithmetic (gloo, Lightning 2.6),
    which truncates when the total is not a multiple of the number of processes (97 images on 2
    processes: the loss sum is divided by 96, 1% off); with the padding sampler the total always
    was a multiple. Hence :class:`FashionClassifier`'s ``MulticlassAccuracy`` and weighted
    ``MeanMetric``.
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


class FashionMNISTDataModule(pl.LightningDataModule):
    """Train / validation split of the 60k training images (``val_size`` held out, fixed seed
    ``split_seed``), test = the 10k test images. Images are standardised with the training-set
    pixel mean and std and kept in memory as ``(N, 1, 28, 28)`` float tensors. The validation
    and test loaders evaluate every image once also on several processes (:func:`eval_sampler`)."""

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        split_seed: int = 0,
        eval_batch_size: int = 1000,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.eval_batch_size = eval_batch_size
        self.train_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        for name in FILES.values():  # fail early, on rank 0, with the message that says what to do
            find_idx_file(self.data_dir, name)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.load("train")
        if not 0 <= self.val_size < len(x):
            raise ValueError(f"val_size must be in [0, {len(x)}), got {self.val_size}")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(*self.load("test"))

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardised images and labels of ``split`` (``"train"`` or ``"test"``)."""
        return load_split(self.data_dir, split)

    def _loader(self, dataset: TensorDataset, batch_size: int, train: bool = False) -> DataLoader:
        """Training (``train=True``): shuffled, whole batches (Lightning adds the distributed
        sampler). Evaluation: in order, each process its unrepeated share."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=None if train else eval_sampler(dataset, self.trainer),
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)


def build_network(arch: str) -> nn.Module:
    """``"mlp"``: 784-256-128-10 with ReLU. ``"cnn"``: conv 5x5 16 (padded) -> max-pool 2 -> conv
    5x5 32 -> max-pool 2 -> linear 800-128 -> linear 128-10 (two conv layers, two linear layers,
    ReLU; a LeNet-5-sized network, so K-FAC's largest factor is 801 x 801)."""
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 14 x 14
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 x 5 x 5
            nn.Flatten(),
            nn.Linear(32 * 5 * 5, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")


class FashionClassifier(pl.LightningModule):
    """Classifier for 28x28 Fashion-MNIST images. ``arch``: ``"mlp"`` or ``"cnn"`` (see
    :func:`build_network`). ``optimizer``: ``"sgd"`` (with ``momentum``) or ``"adamw"``.

    Logs ``train_loss`` every step, ``val_loss``/``val_acc`` on the validation loader and
    ``test_loss``/``test_acc`` on the test loader. Validation dataloader ``i`` is logged under
    ``eval_stages[i]`` (default ``("val", "test")``), so a run can track test accuracy at every
    validation check by giving the validation loop the test loader too.

    Accuracy and loss are torchmetrics metrics, one per stage (``self.accuracy["val"]``,
    ``self.mean_loss["test"]``, ...): a ``MulticlassAccuracy`` and a ``MeanMetric`` weighted by
    batch size, logged as metric objects, which Lightning computes once per epoch from the counts
    of all batches and processes. So they are the accuracy and mean loss over the samples
    evaluated, which are the whole set, each sample once, with :class:`FashionMNISTDataModule`'s
    loaders (see :func:`eval_sampler`).
    """

    eval_stages: tuple[str, ...] = ("val", "test")

    def __init__(
        self,
        arch: str = "mlp",
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.save_hyperparameters()
        self.net = build_network(arch)
        # metrics per stage name (the validation loop may also evaluate the test set: eval_stages);
        # torchmetrics states are not saved in checkpoints
        stages = dict.fromkeys((*self.eval_stages, "val", "test"))
        self.accuracy = nn.ModuleDict({stage: MulticlassAccuracy(num_classes=10, average="micro") for stage in stages})
        self.mean_loss = nn.ModuleDict({stage: MeanMetric() for stage in stages})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        mean_loss, accuracy = self.mean_loss[stage], self.accuracy[stage]
        mean_loss.update(F.cross_entropy(logits, y), weight=len(y))
        accuracy.update(logits, y)
        # the metric objects, not values: computed (and synchronised) once, at the end of the epoch
        self.log(f"{stage}_loss", mean_loss, add_dataloader_idx=False)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, self.eval_stages[dataloader_idx])

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
