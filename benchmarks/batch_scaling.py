"""Critical batch size: steps and seconds to a target accuracy against the global batch size, for
SGD-momentum, AdamW and K-FAC, each tuned per batch size with the same number of trials.

The claim under test (the seed paper's): at LARGE global batches, as in data-parallel training
on many workers, K-FAC needs far fewer steps than first-order methods to reach a given accuracy.
Following Shallue et al. (2019, "Measuring the effects of data parallelism on neural network
training"), the benchmark measures, for every batch size B, the number of optimizer steps each
method needs to reach a target test accuracy, with the method tuned at that batch size. On log-log
axes, perfect scaling is a line of slope -1 (doubling the batch halves the steps); every method
eventually leaves it, at its *critical batch size*, beyond which a larger batch buys few steps.

    python benchmarks/batch_scaling.py                      # everything: tune, seeds, dist, cost, report
    python benchmarks/batch_scaling.py --smoke              # the whole pipeline on generated data (about a minute)
    python benchmarks/batch_scaling.py --stage tune --task mlp --batches 4096 16384
    python benchmarks/batch_scaling.py --kfac '{"inverse_method": "eigen", "damping_mode": "factored"}'

Method
------
* **Tasks.** Fashion-MNIST (55k train / 5k validation held out of the 60k with a fixed seed-0
  permutation, as in ``FashionMNISTDataModule``; 10k test), the MLP 784-256-128-10 (target 0.87
  test accuracy) and the small CNN of ``examples/fashion_mnist.py`` (target 0.89). Data lives in
  memory as tensors; plain torch loops, no Lightning. Each epoch is reshuffled by a
  ``torch.Generator`` seeded with the run's seed (which also seeds the initial weights, so the
  three methods start from the same weights and see the same batches); the last partial batch is
  dropped.
* **Budgets** are fixed step counts per batch size (fewer steps at larger batches). The model is
  evaluated every ``budget / evals`` steps (100 evaluations per budget on the MLP, 50 on the CNN;
  ``--evals`` overrides; ``torch.no_grad``, large evaluation batches); the evaluation time is not
  counted as training time. Steps-to-target is the first evaluation at or above the target, so it
  has a resolution of one evaluation interval. A run ends at the target (``--full-runs``: at its
  budget); the step time of the cost stage, not of these runs, gives the seconds.
* **Methods** (:data:`OPTIMIZERS`). ``sgd``: SGD with momentum 0.9. ``adamw``: AdamW with betas
  (0.9, 0.95) (better than 0.999 at these budgets in the exploration). ``kfac``:
  :class:`lightning_kfac.KFACPreconditioner` in front of SGD with momentum 0.5
  (``loss.backward(); pre.step(); optimizer.step()``; 0.5 needed 35-45% fewer steps than 0.9 at
  batches 4096 and 16384 in the exploration); its KL clip reads the scheduled learning rate.
  Every K-FAC constructor keyword that is not tuned (intervals, decay, KL clip, inverse method,
  damping mode, factor subsampling, ...) comes from the task's ``kfac`` dict
  (:data:`KFAC_FIXED`, and :data:`KFAC_SMALL_BATCH` at batch 128), which ``--kfac`` updates and
  which is passed through unchanged: Cholesky inverses (factored Tikhonov damping), factors and
  inversions every 2 steps, decay 0.95, KL clip 0.1 (0.01 at batch 128); chosen by the
  explorations stored under ``results/batch_scaling/exploration``. No method uses weight decay
  (AdamW's 0.01 default would be the only regulariser in the comparison, and the budgets are
  short).
* **Learning-rate schedule**, the same family for every method: linear warm-up over
  ``--warmup-fraction`` of the budget (at least one step), then constant (``--schedule
  constant``) or a cosine decay reaching 0 at the budget (``--schedule cosine``).
* **Tuning** (stage ``tune``), per task, batch size and method, on seed 0, reading validation
  accuracy, with the same number of trials for every method (4 by default): SGD and AdamW try 4
  learning rates, K-FAC 2 learning rates x 2 dampings. First-order grids are given at a reference
  batch and scaled by the square-root rule (``lr * sqrt(B / 128)``): SGD 0.005-0.04 and AdamW
  5e-4-4e-3 at batch 128, in factors of 2; K-FAC's grid is absolute (lr 0.1, 0.25 x damping
  0.03, 0.1; at batch 128 lr 0.05, 0.1 x damping 0.1, 0.3; its KL clip bounds the step). The CNN
  differs (:func:`cnn_grids`): AdamW 1e-3-8e-3 at 128; at batch 4096, where its step takes
  seconds on one thread, 2 trials per method around each method's best at 512.
  ``--grid`` replaces a method's rule, for every batch or, with ``by_batch``, for given batch
  sizes. Selection: fewest steps to the target; ties, or no trial reaching it, go to the best
  final validation accuracy.
* **Final runs** (stage ``seeds``): the chosen setting with seeds 0 and 1, evaluated on the TEST
  split; the reported steps-to-target is the median over seeds (a seed that misses the target
  counts as infinitely many steps).
* **Per-step cost** (stage ``cost``): for each batch size the three methods' steps are timed side
  by side in interleaved rounds (default 5 rounds x 20 steps after a warm-up, the round a whole
  number of K-FAC's factor and inverse intervals so the inversions are amortised over the real
  interval), and each round's ratios to the SGD step are taken. Reported: medians of those
  ratios, and K-FAC's phases (forward/backward, the factor statistics the hooks compute during
  forward/backward, factor update, inversion, preconditioning, optimizer). Seconds-to-target =
  steps-to-target x the median step time of this stage: on a shared machine absolute times taken
  at different moments are not comparable, so the times of the tuning and seed runs (recorded
  too) are not used for it.
* **Distributed check** (stage ``dist``) at the largest batch of each task: K-FAC on 2 forked
  processes (gloo, ``DistributedDataParallel``; the preconditioner is built on the inner model
  after wrapping), each rank taking its half of every global batch, same seed and settings as the
  1-process seed-0 run. Reported: both steps-to-target (they should agree) and the largest
  parameter difference to a 1-process run after a few steps.
* **Ablation** (stage ``ablation``) at the two largest batches: each variant of
  :data:`ABLATIONS` (momentum underneath, intervals, no KL clip, subsampled statistics, damping
  mode, AdamW underneath at AdamW's own tuned rate) changes one choice of the chosen K-FAC
  setting; steps to target on the final seeds and step cost over the chosen setting's, timed
  side by side in interleaved rounds.
* **Critical batch size** of a method: the largest batch B such that at B and at every smaller
  batch its steps-to-target is within 2x of perfect scaling, S(b) <= 2 * S(B0) * B0 / b, where B0
  is the smallest batch. Given twice: against the method's own S(B0) ("own"), and against the best
  method's S(B0) (the line drawn in the plot, "common").

Outputs under ``--out`` (default ``benchmarks/results/batch_scaling``): ``runs/<task>/*.json``
(one per run: settings, evaluation curve, steps and seconds to target, step times, K-FAC phase
times, environment; an existing file is reused, so an interrupted run resumes; ``--force`` redoes
it), ``cost_<task>.json``, ``dist_<task>.json``, ``summary.json``, ``RESULTS.md`` and the plots
``steps_to_target.png``, ``seconds_to_target.png`` and ``step_cost.png``. Every option that
changes a run (budgets, grids, ``--kfac``, schedule, ...) is part of its identity (a hash in the
file name): give the same options to every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "examples")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fashion_mnist import DEFAULT_DATA_DIR, build_network, load_split  # noqa: E402
from torch import nn  # noqa: E402

import lightning_kfac  # noqa: E402
from lightning_kfac.testing.distributed import run_distributed  # noqa: E402

METHODS = ("sgd", "adamw", "kfac")
LABELS = {"sgd": "SGD-momentum", "adamw": "AdamW", "kfac": "K-FAC + SGD-momentum"}
#: the optimizer settings of each method (not tuned): SGD-momentum's classic 0.9, AdamW with the
#: betas that tuned best at large batch (0.9, 0.95), and SGD with momentum 0.5 under K-FAC (0.9
#: under a natural-gradient step overshoots: it needed 1.6-1.75x the steps at batch 4096-16384
#: in the exploration, results/batch_scaling/exploration/LARGE_BATCH.md)
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},
    "adamw": {"betas": [0.9, 0.95]},
    "kfac": {"momentum": 0.5},
}
MOMENTUM = OPTIMIZERS["sgd"]["momentum"]
WEIGHT_DECAY = 0.0  # for every method, AdamW included (see the module docstring)
VAL_SIZE, SPLIT_SEED = 5000, 0
EVAL_BATCH = 2500
PHASES = ("factors", "inverse", "precondition")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "batch_scaling")
TIMING_NOTE = (
    "Seconds are steps-to-target x the median step time of the interleaved cost stage. The machine "
    "is shared: absolute times measured at different moments (e.g. the tuning runs' own clocks, or "
    "different batch sizes) are not comparable; ratios within one batch size are."
)


# --- tasks and grids ---------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    """A model, its target accuracy, the batch sizes with their step budgets, the tuning grids
    (method -> rule, see :func:`grid_trials`) and the fixed (not tuned) K-FAC keywords."""

    name: str
    arch: str
    target: float
    batches: tuple[int, ...]
    budgets: dict[int, int]
    grids: dict[str, dict[str, Any]]
    kfac: dict[str, Any]
    seeds: tuple[int, ...] = (0, 1)
    #: evaluations per budget (the resolution of steps-to-target is budget / evals)
    evals: int = 40
    #: fixed K-FAC keywords that differ at some batch sizes: {batch: {keyword: value}}
    kfac_by_batch: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def kfac_at(self, batch: int) -> dict[str, Any]:
        return {**self.kfac, **self.kfac_by_batch.get(batch, {})}


# fixed K-FAC keywords; --kfac updates them (engine keywords pass straight through). From the
# explorations on the MLP at batches 4096 and 16384 (results/batch_scaling/exploration): factored
# damping (cholesky; the eigen method's exact damping needed 2x the steps or more), a KL clip of
# 0.1 (a guard rail that lets the large rates work), factors and inversions every 2 steps (5 and
# 10 cost about 13% more steps; the ablation stage measures intervals and subsampling).
KFAC_FIXED = {
    "inverse_method": "cholesky",
    "factor_update_freq": 2,
    "inv_update_freq": 2,
    "factor_decay": 0.95,
    "kl_clip": 0.1,
}
# small batches need a tighter clip (batch 128: K-FAC missed the target with 0.1)
KFAC_SMALL_BATCH = {128: {"kl_clip": 0.01}}


def default_grids() -> dict[str, dict[str, Any]]:
    """4 trials per method. First-order learning rates are given at ``ref_batch`` and scaled by
    ``scale`` ("sqrt", "linear" or "none"); K-FAC's are absolute. The grids bracket the best
    settings the explorations found at batches 4096 and 16384 (SGD 0.1, AdamW 0.01-0.02, K-FAC
    with momentum 0.5: lr 0.1-0.4, damping 0.03-0.1) and at 128 (K-FAC lr 0.1, damping 0.1)."""
    return {
        "sgd": {"lrs": [0.005, 0.01, 0.02, 0.04], "scale": "sqrt", "ref_batch": 128},
        "adamw": {"lrs": [5e-4, 1e-3, 2e-3, 4e-3], "scale": "sqrt", "ref_batch": 128},
        "kfac": {
            "lrs": [0.1, 0.25],
            "dampings": [0.03, 0.1],
            "scale": "none",
            "by_batch": {"128": {"lrs": [0.05, 0.1], "dampings": [0.1, 0.3]}},
        },
    }


def cnn_grids() -> dict[str, dict[str, Any]]:
    """The CNN's grids. On the shared ones AdamW's best trial at batches 128 and 512, and K-FAC's at
    128, lay at the grid's upper edge, so AdamW's rates are doubled (1e-3 to 8e-3 at 128) and
    K-FAC's batch-128 grid moves to lr 0.1, 0.2 x damping 0.03, 0.1; 4 trials each. At batch 4096
    a CNN step takes seconds on one thread, so each method gets 2 trials around its best at 512
    scaled by the square-root rule (SGD 0.04-0.08 and AdamW 8e-3 at 512: x 2.83; K-FAC lr 0.1 and
    the MLP's large-batch 0.25, damping 0.03)."""
    grids = default_grids()
    grids["sgd"]["by_batch"] = {"4096": {"lrs": [0.113, 0.226]}}
    grids["adamw"]["lrs"] = [1e-3, 2e-3, 4e-3, 8e-3]
    grids["adamw"]["by_batch"] = {"4096": {"lrs": [0.0113, 0.0226]}}
    grids["kfac"]["by_batch"] = {
        "128": {"lrs": [0.1, 0.2], "dampings": [0.03, 0.1]},
        "4096": {"lrs": [0.1, 0.25], "dampings": [0.03]},
    }
    return grids


def default_tasks() -> dict[str, Task]:
    """The MLP at batches 128-16384 and the CNN at 128, 512 and 4096 (its step is about 8x the
    MLP's; 2048 is left out to keep the whole benchmark within a few hours on 2 cores)."""
    mlp_budgets = {128: 2000, 512: 1000, 2048: 400, 4096: 250, 16384: 200}
    cnn_budgets = {128: 1500, 512: 600, 4096: 150}
    return {
        name: Task(
            name=name,
            arch=name,
            target=target,
            batches=tuple(budgets),
            budgets=budgets,
            grids=grids,
            kfac=dict(KFAC_FIXED),
            evals=evals,
            kfac_by_batch=dict(KFAC_SMALL_BATCH),
        )
        for name, target, budgets, grids, evals in (
            ("mlp", 0.87, mlp_budgets, default_grids(), 100),
            ("cnn", 0.89, cnn_budgets, cnn_grids(), 50),
        )
    }


def smoke_tasks() -> dict[str, Task]:
    """Tiny budgets and 2 trials per method, on generated data (see :func:`synthetic_data`)."""
    budgets = {8: 16, 32: 8}
    grids = {
        "sgd": {"lrs": [0.03, 0.1], "scale": "sqrt", "ref_batch": 8},
        "adamw": {"lrs": [1e-3, 3e-3], "scale": "sqrt", "ref_batch": 8},
        "kfac": {"lrs": [0.1, 0.3], "dampings": [1e-2], "scale": "none"},
    }
    kfac = {**KFAC_FIXED, "factor_update_freq": 1, "inv_update_freq": 4}
    return {
        name: Task(name, name, 0.7, tuple(budgets), dict(budgets), json.loads(json.dumps(grids)), dict(kfac))
        for name in ("mlp", "cnn")
    }


def budget_for(task: Task, batch: int) -> int:
    """The task's budget at ``batch``; for a batch without one, that of the nearest listed batch
    (in log scale)."""
    if batch in task.budgets:
        return task.budgets[batch]
    nearest = min(task.budgets, key=lambda b: abs(math.log(b / batch)))
    return task.budgets[nearest]


def grid_trials(task: Task, method: str, batch: int) -> list[dict[str, float | None]]:
    """The settings tried for ``method`` at ``batch``: dicts ``{"lr", "damping"}``. A rule is
    ``{"lrs": [...], "scale": "sqrt"|"linear"|"none", "ref_batch": 128, "dampings": [...]
    (K-FAC), "by_batch": {"<batch>": {"lrs": [...], "dampings": [...]}}}``; a ``by_batch`` entry
    gives absolute values for that batch."""
    rule = dict(task.grids[method])
    override = rule.pop("by_batch", {}).get(str(batch))
    if override is not None:
        rule.update(override, scale="none")
    exponent = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}[rule.get("scale", "none")]
    factor = (batch / rule.get("ref_batch", 128)) ** exponent
    lrs = [float(f"{lr * factor:.3g}") for lr in rule["lrs"]]
    dampings = rule.get("dampings", [1e-2]) if method == "kfac" else [None]
    return [{"lr": lr, "damping": damping} for lr in lrs for damping in dampings]


def settings_label(settings: dict[str, Any]) -> str:
    label = f"lr{settings['lr']:g}"
    return label if settings.get("damping") is None else f"{label}_d{settings['damping']:g}"


# --- data --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    """Images (N, 1, 28, 28) float and labels (N,) long of the three splits."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.val_x, self.val_y) if name == "val" else (self.test_x, self.test_y)


def fashion_data(data_dir: str) -> Data:
    """Fashion-MNIST: 55k train / 5k validation (seed-0 permutation of the 60k) / 10k test."""
    x, y = load_split(data_dir, "train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = order[:VAL_SIZE], order[VAL_SIZE:]
    test_x, test_y = load_split(data_dir, "test")
    return Data(
        x[train].contiguous(),
        y[train].contiguous(),
        x[val].contiguous(),
        y[val].contiguous(),
        test_x,
        test_y,
        source="fashion-mnist",
    )


def synthetic_data(n_train: int = 1024, n_eval: int = 256, seed: int = 0) -> Data:
    """A 10-class stand-in for the smoke test: each class is a fixed random 28x28 pattern, each
    image its class pattern (scaled by 0.5) plus unit Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 28, 28, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=gen)
        return 0.5 * patterns[labels] + torch.randn(n, 1, 28, 28, generator=gen), labels

    (tx, ty), (vx, vy), (sx, sy) = draw(n_train), draw(n_eval), draw(n_eval)
    return Data(tx, ty, vx, vy, sx, sy, source="synthetic")


def batch_order(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Index tensors of global batches: a fresh permutation per epoch from a generator seeded
    with ``seed``, the last partial batch dropped."""
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the training set ({n})")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


# --- one training run --------------------------------------------------------------------------
@dataclasses.dataclass
class RunSpec:
    """Everything that defines a run; its hash names the run's JSON file."""

    task: str
    arch: str
    method: str
    batch: int
    budget: int
    seed: int
    lr: float
    damping: float | None
    kfac: dict[str, Any] | None  # the fixed K-FAC keywords (K-FAC runs only)
    optimizer: dict[str, Any]  # the method's optimizer settings (momentum, betas)
    split: str  # the evaluated split: "val" (tuning) or "test" (final runs)
    target: float
    schedule: str
    warmup_fraction: float
    eval_every: int
    data: str
    world_size: int = 1
    stop_at_target: bool = False

    def key(self) -> str:
        """Hash of every field but the seed (the seed is in the file name)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "seed"}
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:8]


def lr_factor(step: int, budget: int, warmup_fraction: float, schedule: str) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: linear warm-up over
    ``warmup_fraction`` of the budget (at least 1 step), then constant, or cosine to 0 at the budget."""
    warmup = max(1, round(warmup_fraction * budget))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    progress = (step - warmup) / max(1, budget - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(method: str, model: nn.Module, lr: float, settings: dict[str, Any]) -> torch.optim.Optimizer:
    if method == "adamw":
        betas = tuple(settings.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=WEIGHT_DECAY)  # type: ignore[arg-type]
    if method == "kfac" and settings.get("base") == "adamw":  # AdamW underneath K-FAC (an ablation)
        betas = tuple(settings.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=WEIGHT_DECAY)  # type: ignore[arg-type]
    if method in ("sgd", "kfac"):
        momentum = settings.get("momentum", MOMENTUM)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_preconditioner(
    model: nn.Module, damping: float, kfac: dict[str, Any], optimizer: torch.optim.Optimizer
) -> lightning_kfac.KFACPreconditioner:
    """K-FAC on ``model`` (the inner module when wrapped in DDP). Every key of ``kfac`` goes to the
    constructor as it is; the KL clip reads the optimizer's current (scheduled) learning rate."""
    return lightning_kfac.KFACPreconditioner(model, damping=damping, lr=lambda: optimizer.param_groups[0]["lr"], **kfac)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``x, y`` in batches of ``EVAL_BATCH``."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        labels = y[start : start + EVAL_BATCH]
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(x), loss_sum / len(x)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, pre: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step; returns the training loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if pre is not None:
        pre.step()
    optimizer.step()
    return float(loss.detach())


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def kl_clip_summary(scales: list[float]) -> dict[str, float] | None:
    """K-FAC's applied KL-clip factor nu over a run (1: the clip did not bind): quartiles and the
    fraction of steps it bound, over the whole run and over its first 10%."""
    if not scales:
        return None
    early = scales[: max(1, len(scales) // 10)]
    q1, median, q3 = statistics.quantiles(scales, n=4) if len(scales) > 1 else [scales[0]] * 3
    return {
        "median": median, "q1": q1, "q3": q3, "min": min(scales),
        "bound_fraction": sum(s < 1.0 for s in scales) / len(scales),
        "early_median": statistics.median(early),
    }  # fmt: skip


class Recorder:
    """Training seconds (evaluation excluded), per-step times, K-FAC phase times, the evaluation
    curve and the training loss averaged between evaluations."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.train_seconds = 0.0
        self.step_ms: list[float] = []
        self.phase_ms: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.curve: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.kl_scales: list[float] = []
        self.diverged = False

    def record_step(self, seconds: float, loss: float, pre: Any) -> None:
        self.train_seconds += seconds
        self.step_ms.append(seconds * 1e3)
        self.losses.append(loss)
        self.diverged = self.diverged or not math.isfinite(loss)
        if pre is not None:
            for phase in PHASES:
                self.phase_ms[phase].append(pre.timings_ms.get(phase, 0.0))
            if pre.last_kl_scale is not None:
                self.kl_scales.append(float(pre.last_kl_scale))

    def record_eval(self, step: int, acc: float, loss: float) -> None:
        train_loss = statistics.fmean(self.losses) if self.losses else float("nan")
        self.losses = []
        self.curve.append(
            {
                "step": step,
                "seconds": round(self.train_seconds, 4),
                "acc": acc,
                "loss": finite_or_none(loss),
                "train_loss": finite_or_none(train_loss),
            }
        )

    def reached(self) -> dict[str, Any] | None:
        return next((point for point in self.curve if point["acc"] >= self.spec.target), None)

    def should_stop(self) -> bool:
        return self.diverged or (self.spec.stop_at_target and self.reached() is not None)

    def result(self) -> dict[str, Any]:
        hit = self.reached()
        phases = {
            phase: {"median": statistics.median(v), "mean": statistics.fmean(v)}
            for phase, v in self.phase_ms.items()
            if v
        }
        return {
            "spec": dataclasses.asdict(self.spec),
            "steps_to_target": hit["step"] if hit else None,
            "seconds_to_target_measured": hit["seconds"] if hit else None,
            "final_acc": self.curve[-1]["acc"] if self.curve else None,
            "best_acc": max((p["acc"] for p in self.curve), default=None),
            "steps_run": len(self.step_ms),
            "diverged": self.diverged,
            "train_seconds": self.train_seconds,
            "step_ms_median": statistics.median(self.step_ms) if self.step_ms else None,
            "step_ms_mean": statistics.fmean(self.step_ms) if self.step_ms else None,
            "kfac_phase_ms": phases or None,
            "kl_clip_scale": kl_clip_summary(self.kl_scales),
            "curve": self.curve,
            "environment": environment(),
        }


def train(
    spec: RunSpec,
    data: Data,
    rank: int = 0,
    stop_after: int | None = None,
    snapshot_at: int | None = None,
    keep_final_params: bool = False,
) -> dict[str, Any]:
    """One run of ``spec`` (rank ``rank`` of ``spec.world_size``, inside an initialised process
    group when that is > 1). ``stop_after``: end after that many steps; ``snapshot_at``: keep the
    flat parameters after that step under ``"params"``, ``keep_final_params`` the last ones under
    ``"final_params"`` (both for the distributed check)."""
    torch.manual_seed(spec.seed)
    net = build_network(spec.arch)
    model = nn.parallel.DistributedDataParallel(net) if spec.world_size > 1 else net
    optimizer = make_optimizer(spec.method, net, spec.lr, spec.optimizer)
    pre = make_preconditioner(net, spec.damping, spec.kfac or {}, optimizer) if spec.method == "kfac" else None
    eval_x, eval_y = data.split(spec.split)
    local = spec.batch // spec.world_size
    batches = batch_order(len(data.train_x), spec.batch, spec.seed)
    recorder, params = Recorder(spec), None
    for step in range(min(spec.budget, stop_after or spec.budget)):
        optimizer.param_groups[0]["lr"] = spec.lr * lr_factor(step, spec.budget, spec.warmup_fraction, spec.schedule)
        start = time.perf_counter()
        index = next(batches)[rank * local : (rank + 1) * local]
        loss = train_step(model, optimizer, pre, data.train_x[index], data.train_y[index])
        recorder.record_step(time.perf_counter() - start, loss, pre)
        if step + 1 == snapshot_at:
            params = flat_parameters(net)
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.budget or recorder.diverged:
            recorder.record_eval(step + 1, *evaluate(net, eval_x, eval_y))
            if recorder.should_stop() and step + 1 >= (snapshot_at or 0):
                break
    if pre is not None:
        pre.remove()
    result = recorder.result()
    if params is not None:
        result["params"] = params
    if keep_final_params:
        result["final_params"] = flat_parameters(net)
    return result


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


_ENVIRONMENT: dict[str, Any] = {}


def environment() -> dict[str, Any]:
    """Versions, threads and which engine source ran (sha256 of lightning_kfac's .py files)."""
    if not _ENVIRONMENT:
        package = os.path.dirname(os.path.abspath(lightning_kfac.__file__))
        digest = hashlib.sha256()
        for folder, _, files in sorted(os.walk(package)):
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
        _ENVIRONMENT.update(
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.machine(),
            cpus=os.cpu_count(),
            lightning_kfac=lightning_kfac.__version__,
            lightning_kfac_path=package,
            lightning_kfac_sha256=digest.hexdigest()[:12],
        )
    return {**_ENVIRONMENT, "threads": torch.get_num_threads()}


# --- the run store and the stages tune / seeds ---------------------------------------------------
@dataclasses.dataclass
class Options:
    """The command line, resolved: where results go and the choices shared by every run."""

    out: str
    data: Data
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    evals: int | None = None  # None: the task's own
    force: bool = False
    stop_at_target: bool = True
    cost_rounds: int = 5
    cost_steps: int = 20
    dist_check_steps: int = 5
    #: the names of :data:`ABLATIONS` the ablation stage runs (None: all), and at which batches
    #: (None: the task's two largest)
    ablations: tuple[str, ...] | None = None
    ablation_batches: tuple[int, ...] | None = None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_spec(
    opts: Options,
    task: Task,
    method: str,
    batch: int,
    settings: dict[str, Any],
    seed: int,
    split: str,
    world_size: int = 1,
) -> RunSpec:
    budget = budget_for(task, batch)
    return RunSpec(
        task=task.name,
        arch=task.arch,
        method=method,
        batch=batch,
        budget=budget,
        seed=seed,
        lr=settings["lr"],
        damping=settings["damping"] if method == "kfac" else None,
        kfac=task.kfac_at(batch) if method == "kfac" else None,
        optimizer=dict(OPTIMIZERS[method]),
        split=split,
        target=task.target,
        schedule=opts.schedule,
        warmup_fraction=opts.warmup_fraction,
        eval_every=max(1, budget // (opts.evals or task.evals)),
        data=opts.data.source,
        world_size=world_size,
        stop_at_target=opts.stop_at_target,
    )


def run_path(opts: Options, stage: str, spec: RunSpec, settings: dict[str, Any]) -> str:
    name = f"{stage}_{spec.method}_b{spec.batch}_{settings_label(settings)}_{spec.key()}_s{spec.seed}.json"
    return os.path.join(opts.out, "runs", spec.task, name)


def write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=False, default=str)
    os.replace(tmp, path)  # never a half-written file to resume from


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def run_or_load(opts: Options, stage: str, spec: RunSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """The stored result of this run, or a fresh one (stored before it is returned)."""
    path = run_path(opts, stage, spec, settings)
    if os.path.exists(path) and not opts.force:
        return read_json(path)
    log(
        f"{stage} {spec.task} b={spec.batch} {spec.method} {settings_label(settings)} seed={spec.seed} "
        f"({spec.budget} steps, eval on {spec.split} every {spec.eval_every})"
    )
    result = train(spec, opts.data)
    result.update(stage=stage, settings=settings)
    write_json(path, result)
    log(
        f"  -> steps to {spec.target}: {result['steps_to_target']}, final acc {result['final_acc']:.4f}, "
        f"step {result['step_ms_median']:.1f} ms, {result['train_seconds']:.1f} s"
    )
    return result


def check_equal_trials(task: Task, batch: int) -> int:
    counts = {method: len(grid_trials(task, method, batch)) for method in METHODS}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{task.name} b={batch}: the methods must get the same number of trials, got {counts}")
    return counts["sgd"]


def stage_tune(opts: Options, task: Task) -> None:
    for batch in task.batches:
        check_equal_trials(task, batch)
        for method in METHODS:
            for settings in grid_trials(task, method, batch):
                run_or_load(opts, "tune", make_spec(opts, task, method, batch, settings, 0, "val"), settings)


def selection_key(result: dict[str, Any]) -> tuple[float, float]:
    """Fewest steps to the target, then the best final accuracy (a NaN or missing one last)."""
    steps = result["steps_to_target"]
    final = result["final_acc"] if result["final_acc"] is not None else -1.0
    return (steps if steps is not None else math.inf, -final)


def tuning_results(opts: Options, task: Task, method: str, batch: int) -> list[dict[str, Any]]:
    """The stored tuning runs of the current grid (missing ones left out)."""
    found = []
    for settings in grid_trials(task, method, batch):
        path = run_path(opts, "tune", make_spec(opts, task, method, batch, settings, 0, "val"), settings)
        if os.path.exists(path):
            found.append(read_json(path))
    return found


def chosen_settings(opts: Options, task: Task, method: str, batch: int) -> dict[str, Any] | None:
    results = tuning_results(opts, task, method, batch)
    if not results:
        return None
    return min(results, key=selection_key)["settings"]


def settings_or_fallback(opts: Options, task: Task, method: str, batch: int) -> tuple[dict[str, Any], bool]:
    """The tuned choice, or (not tuned yet) the middle of the grid; the flag says which."""
    chosen = chosen_settings(opts, task, method, batch)
    if chosen is not None:
        return chosen, True
    trials = grid_trials(task, method, batch)
    return trials[len(trials) // 2], False


def require_chosen(opts: Options, task: Task, method: str, batch: int) -> dict[str, Any]:
    """The choice of a complete tuning grid (SystemExit when a trial is missing)."""
    found, wanted = len(tuning_results(opts, task, method, batch)), len(grid_trials(task, method, batch))
    if found < wanted:
        raise SystemExit(
            f"{task.name} b={batch} {method}: {found} of {wanted} tuning runs found; run --stage tune "
            "first, with the same options (they are part of every run's identity)"
        )
    return chosen_settings(opts, task, method, batch)


def stage_seeds(opts: Options, task: Task) -> None:
    for batch in task.batches:
        for method in METHODS:
            settings = require_chosen(opts, task, method, batch)
            for seed in task.seeds:
                run_or_load(opts, "seed", make_spec(opts, task, method, batch, settings, seed, "test"), settings)


def seed_results(opts: Options, task: Task, method: str, batch: int) -> list[dict[str, Any]]:
    settings = chosen_settings(opts, task, method, batch)
    if settings is None:
        return []
    paths = [
        run_path(opts, "seed", make_spec(opts, task, method, batch, settings, seed, "test"), settings)
        for seed in task.seeds
    ]
    return [read_json(path) for path in paths if os.path.exists(path)]


# --- the distributed check -----------------------------------------------------------------------
def _dist_rank(rank: int, world_size: int, spec: RunSpec, data: Data, snapshot_at: int) -> dict[str, Any]:
    return train(spec, data, rank=rank, snapshot_at=snapshot_at, keep_final_params=True)


def stage_dist(opts: Options, task: Task, world_size: int = 2) -> dict[str, Any]:
    """K-FAC at the task's largest batch on ``world_size`` forked processes against the 1-process
    seed-0 run of the same settings: steps-to-target of both, and the largest parameter difference
    to a 1-process run after ``opts.dist_check_steps`` steps."""
    batch = max(task.batches)
    if batch % world_size:
        raise ValueError(f"batch {batch} does not split over {world_size} processes")
    settings = require_chosen(opts, task, "kfac", batch)
    single_spec = make_spec(opts, task, "kfac", batch, settings, 0, "test")
    single = run_or_load(opts, "seed", single_spec, settings)
    spec = make_spec(opts, task, "kfac", batch, settings, 0, "test", world_size=world_size)
    path = run_path(opts, "dist", spec, settings)
    if os.path.exists(path) and not opts.force:
        summary = read_json(path)
    else:
        steps = opts.dist_check_steps
        log(
            f"dist {task.name} b={batch} kfac {settings_label(settings)}: "
            f"{world_size} processes x {batch // world_size}"
        )
        ranks = run_distributed(
            _dist_rank, world_size, spec, opts.data, steps, timeout=3600.0, threads=torch.get_num_threads()
        )
        reference = train(single_spec, opts.data, stop_after=steps, snapshot_at=steps)["params"]
        summary = summarise_dist(ranks, reference, single, steps)
        summary.update(stage="dist", settings=settings)
        write_json(path, summary)
    write_json(os.path.join(opts.out, f"dist_{task.name}.json"), summary)
    log(
        f"  -> steps to target: 1 process {summary['steps_to_target_1_process']}, {world_size} processes "
        f"{summary['steps_to_target_n_processes']}; max |param diff| after {summary['check_steps']} steps "
        f"{summary['max_param_diff_after_check_steps']:.3g}"
    )
    return summary


def summarise_dist(
    ranks: list[dict[str, Any]], reference: torch.Tensor, single: dict[str, Any], check_steps: int
) -> dict[str, Any]:
    first = ranks[0]
    rank_gap = max(float((r["final_params"] - first["final_params"]).abs().max()) for r in ranks)
    run = {k: v for k, v in first.items() if k not in ("params", "final_params")}
    return {
        "world_size": len(ranks),
        "steps_to_target_1_process": single["steps_to_target"],
        "steps_to_target_n_processes": first["steps_to_target"],
        "agree": single["steps_to_target"] == first["steps_to_target"],
        "final_acc_1_process": single["final_acc"],
        "final_acc_n_processes": first["final_acc"],
        "check_steps": check_steps,
        "max_param_diff_after_check_steps": float((first["params"] - reference).abs().max()),
        "max_param_abs_after_check_steps": float(reference.abs().max()),
        "max_param_diff_between_ranks_final": rank_gap,
        "run_rank0": run,
    }


# --- the ablation stage: K-FAC's own choices at the largest batches ---------------------------------
#: variants of the fixed K-FAC keywords (and, under "optimizer", of the SGD settings under K-FAC),
#: each run at the chosen (lr, damping) with the final seeds
ABLATIONS: dict[str, dict[str, Any]] = {
    "momentum 0.9": {"optimizer": {"momentum": 0.9}},
    "factors 1, inversions 1": {"factor_update_freq": 1, "inv_update_freq": 1},
    "factors 1, inversions 10": {"factor_update_freq": 1, "inv_update_freq": 10},
    "factors 2, inversions 10 (the defaults)": {"factor_update_freq": 2, "inv_update_freq": 10},
    "factors 5, inversions 10": {"factor_update_freq": 5, "inv_update_freq": 10},
    "no KL clip": {"kl_clip": None},
    # the learning rate AdamW was tuned to alone at this batch
    "AdamW underneath": {"optimizer": {"base": "adamw", "betas": [0.9, 0.95]}, "lr": "adamw"},
    "factor_samples 1024": {"factor_samples": 1024},
    "factor_samples 256": {"factor_samples": 256},
    "eigen, factored damping": {"inverse_method": "eigen", "damping_mode": "factored"},
    "eigen, exact damping": {"inverse_method": "eigen", "damping_mode": "exact"},
}


def stage_ablation(opts: Options, task: Task) -> list[dict[str, Any]]:
    """At the two largest batches: steps to target (test, the final seeds) of each variant of
    :data:`ABLATIONS` against the chosen setting, and its step cost relative to the chosen
    setting's, timed side by side in interleaved rounds. Writes ``ablation_<task>.json``."""
    rows = []
    for batch in opts.ablation_batches or sorted(task.batches)[-2:]:
        chosen = require_chosen(opts, task, "kfac", batch)
        variants = {
            "chosen": {},
            **{k: v for k, v in ABLATIONS.items() if opts.ablations is None or k in opts.ablations},
        }
        timings = measure_variant_costs(opts, task, batch, chosen, variants)
        for label, change in variants.items():
            kfac, optimizer, lr = apply_change(opts, task, batch, chosen, change)
            steps = []
            for seed in task.seeds:
                spec = make_spec(opts, task, "kfac", batch, chosen, seed, "test")
                spec = dataclasses.replace(spec, kfac=kfac, optimizer=optimizer, lr=lr)
                steps.append(run_or_load(opts, "ablation", spec, {**chosen, "lr": lr})["steps_to_target"])
            rows.append({"batch": batch, "variant": label, "kfac": kfac, "steps": steps,
                         "steps_median": median_steps(steps), "cost_over_chosen": timings[label]})  # fmt: skip
            log(
                f"ablation {task.name} b={batch} {label}: steps {steps}, "
                f"cost x{timings[label]:.2f} of the chosen setting"
            )
    write_json(os.path.join(opts.out, f"ablation_{task.name}.json"), rows)
    return rows


def apply_change(
    opts: Options, task: Task, batch: int, chosen: dict[str, Any], change: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """An ablation variant's (K-FAC keywords, optimizer settings, learning rate): ``change``'s
    ``optimizer`` entries update K-FAC's optimizer settings, its ``lr`` replaces the chosen one
    (``"adamw"``: the rate AdamW was tuned to at this batch), the rest update the K-FAC keywords."""
    optimizer = {**OPTIMIZERS["kfac"], **change.get("optimizer", {})}
    kfac = {**task.kfac_at(batch), **{k: v for k, v in change.items() if k not in ("optimizer", "lr")}}
    lr = change.get("lr", chosen["lr"])
    if lr == "adamw":
        lr = require_chosen(opts, task, "adamw", batch)["lr"]
    return kfac, optimizer, float(lr)


def measure_variant_costs(
    opts: Options, task: Task, batch: int, chosen: dict[str, Any], variants: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Median over interleaved rounds of each variant's step time over the chosen setting's."""
    changed = {label: apply_change(opts, task, batch, chosen, change) for label, change in variants.items()}
    steps = max(round_length(kfac, opts.cost_steps) for kfac, _, _ in changed.values())
    benches = {
        label: StepBench(
            task, "kfac", {**chosen, "kfac": kfac, "lr": lr, "optimizer": optimizer}, batch, opts.data, steps
        )
        for label, (kfac, optimizer, lr) in changed.items()
    }
    for bench in benches.values():
        bench.run(steps)  # warm-up: full-rank factors, a whole period
    ratios: dict[str, list[float]] = {label: [] for label in benches}
    labels = list(benches)
    for r in range(opts.cost_rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        times = {label: benches[label].run(steps)["step"] for label in order}
        for label in labels:
            ratios[label].append(times[label] / times["chosen"])
    return {label: statistics.median(values) for label, values in ratios.items()}


# --- the per-step cost stage ---------------------------------------------------------------------
COST_PARTS = ("data", "forward_backward", "factors", "inverse", "precondition", "kfac_other", "optimizer")


class StepBench:
    """One method's model, optimizer (and preconditioner) stepping through the training set; the
    learning rate ramps up linearly over the first ``warmup_steps`` steps, then stays."""

    def __init__(
        self, task: Task, method: str, settings: dict[str, Any], batch: int, data: Data, warmup_steps: int
    ) -> None:
        torch.manual_seed(0)
        self.model = build_network(task.arch)
        self.optimizer = make_optimizer(
            method, self.model, settings["lr"], settings.get("optimizer", OPTIMIZERS[method])
        )
        kfac = settings.get("kfac") or task.kfac_at(batch)
        self.pre = (
            make_preconditioner(self.model, settings["damping"], kfac, self.optimizer) if method == "kfac" else None
        )
        self.lr, self.warmup_steps, self.steps = settings["lr"], warmup_steps, 0
        self.batches = batch_order(len(data.train_x), batch, 0)
        self.data = data

    def run(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per step of every part of :data:`COST_PARTS`, and of the whole step."""
        total = dict.fromkeys(COST_PARTS, 0.0)
        for _ in range(steps):
            self.optimizer.param_groups[0]["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup_steps)
            self.steps += 1
            t0 = time.perf_counter()
            index = next(self.batches)
            x, y = self.data.train_x[index], self.data.train_y[index]
            t1 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            t2 = time.perf_counter()
            if self.pre is not None:
                self.pre.step()
                for phase in PHASES:
                    total[phase] += self.pre.timings_ms.get(phase, 0.0) / 1e3
            t3 = time.perf_counter()
            self.optimizer.step()
            t4 = time.perf_counter()
            total["data"] += t1 - t0
            total["forward_backward"] += t2 - t1
            if self.pre is not None:
                total["kfac_other"] += (t3 - t2) - sum(self.pre.timings_ms.get(p, 0.0) for p in PHASES) / 1e3
            total["optimizer"] += t4 - t3
        parts = {part: seconds * 1e3 / steps for part, seconds in total.items()}
        parts["step"] = sum(parts.values())
        return parts


def round_length(kfac: dict[str, Any], wanted: int) -> int:
    """The smallest multiple of K-FAC's factor and inverse intervals that is >= ``wanted``."""
    period = math.lcm(int(kfac.get("factor_update_freq", 1)), int(kfac.get("inv_update_freq", 10)))
    return period * max(1, math.ceil(wanted / period))


def measure_costs(opts: Options, task: Task, batch: int, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Interleaved rounds (the order rotating) of every method's steps after a one-round warm-up."""
    steps = round_length(task.kfac, opts.cost_steps)
    benches = {m: StepBench(task, m, settings[m], batch, opts.data, warmup_steps=steps) for m in METHODS}
    for bench in benches.values():
        bench.run(steps)
    rounds = []
    for r in range(opts.cost_rounds):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        rounds.append({m: benches[m].run(steps) for m in order})
    for bench in benches.values():
        if bench.pre is not None:
            bench.pre.remove()
    return {"batch": batch, "round_steps": steps, "rounds": opts.cost_rounds, **summarise_costs(rounds)}


def summarise_costs(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians over rounds: step times, ratios to SGD (and K-FAC to AdamW) and every part as a
    fraction of the SGD step; K-FAC's forward/backward split into the plain one (SGD's) and the
    factor statistics its hooks compute."""

    def median(values: list[float]) -> float:
        return statistics.median(values)

    fractions: dict[str, dict[str, float]] = {}
    for method in METHODS:
        fractions[method] = {
            part: median([r[method][part] / r["sgd"]["step"] for r in rounds])
            for part in COST_PARTS
            if any(r[method][part] for r in rounds)
        }
    hooks = [max(0.0, r["kfac"]["forward_backward"] - r["sgd"]["forward_backward"]) / r["sgd"]["step"] for r in rounds]
    fractions["kfac"]["hook_statistics"] = median(hooks)
    fractions["kfac"]["forward_backward"] = median(
        [min(r["kfac"]["forward_backward"], r["sgd"]["forward_backward"]) / r["sgd"]["step"] for r in rounds]
    )
    return {
        "step_ms_median": {m: median([r[m]["step"] for r in rounds]) for m in METHODS},
        "ratio_to_sgd": {m: median([r[m]["step"] / r["sgd"]["step"] for r in rounds]) for m in METHODS},
        "ratio_kfac_to_adamw": median([r["kfac"]["step"] / r["adamw"]["step"] for r in rounds]),
        "parts_ms_median": {m: {p: median([r[m][p] for r in rounds]) for p in (*COST_PARTS, "step")} for m in METHODS},
        "fraction_of_sgd_step": fractions,
        "per_round_ms": rounds,
    }


def stage_cost(opts: Options, task: Task) -> list[dict[str, Any]]:
    results = []
    for batch in task.batches:
        chosen = {m: settings_or_fallback(opts, task, m, batch) for m in METHODS}
        settings = {m: s for m, (s, _) in chosen.items()}
        key = hashlib.sha1(
            json.dumps(
                [
                    settings,
                    task.kfac,
                    task.arch,
                    opts.cost_rounds,
                    opts.cost_steps,
                    opts.data.source,
                    torch.get_num_threads(),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        )
        path = os.path.join(opts.out, "runs", task.name, f"cost_b{batch}_{key.hexdigest()[:8]}.json")
        if os.path.exists(path) and not opts.force:
            results.append(read_json(path))
            continue
        log(f"cost {task.name} b={batch}: {opts.cost_rounds} interleaved rounds")
        result = measure_costs(opts, task, batch, settings)
        result.update(
            settings=settings,
            tuned={m: t for m, (_, t) in chosen.items()},
            kfac=task.kfac,
            environment=environment(),
            note=TIMING_NOTE,
        )
        write_json(path, result)
        ratios = ", ".join(f"{m} {result['ratio_to_sgd'][m]:.2f}" for m in METHODS)
        log(f"  -> SGD step {result['step_ms_median']['sgd']:.1f} ms; ratios to SGD: {ratios}")
        results.append(result)
    write_json(os.path.join(opts.out, f"cost_{task.name}.json"), results)
    return results


# --- the report ----------------------------------------------------------------------------------
def median_steps(steps: list[int | None]) -> float | None:
    """Median over seeds, a missed target counting as infinitely many steps (None if the median is)."""
    if not steps:
        return None
    value = statistics.median([math.inf if s is None else s for s in steps])
    return None if math.isinf(value) else value


def method_entry(opts: Options, task: Task, method: str, batch: int, cost: dict[str, Any] | None) -> dict[str, Any]:
    """Tuning trials, chosen setting, per-seed results and seconds-to-target of one method."""
    trials = [
        {
            "settings": r["settings"],
            "steps_to_target": r["steps_to_target"],
            "final_val_acc": r["final_acc"],
            "diverged": r["diverged"],
        }
        for r in tuning_results(opts, task, method, batch)
    ]
    seeds = seed_results(opts, task, method, batch)
    steps = median_steps([r["steps_to_target"] for r in seeds])
    if cost is not None:
        step_ms, timing = cost["step_ms_median"][method], "cost stage (interleaved)"
    else:
        values = [r["step_ms_median"] for r in seeds]
        step_ms, timing = (statistics.median(values) if values else None), "seed runs (not interleaved)"
    return {
        "settings": chosen_settings(opts, task, method, batch),
        "trials": trials,
        "seeds": [r["spec"]["seed"] for r in seeds],
        "steps_to_target": [r["steps_to_target"] for r in seeds],
        "steps_median": steps,
        "final_test_acc": [r["final_acc"] for r in seeds],
        "step_ms": step_ms,
        "step_ms_source": timing,
        "seconds_to_target": steps * step_ms / 1e3 if steps is not None and step_ms is not None else None,
        # K-FAC: the applied KL-clip factor per seed (runs written before it was recorded: None)
        "kl_clip_scale": [r.get("kl_clip_scale") for r in seeds] if method == "kfac" else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def batch_row(opts: Options, task: Task, batch: int, cost: dict[str, Any] | None) -> dict[str, Any]:
    methods = {m: method_entry(opts, task, m, batch, cost) for m in METHODS}
    kfac, adamw, sgd = methods["kfac"], methods["adamw"], methods["sgd"]
    step_ratio = ratio(kfac["steps_median"], adamw["steps_median"])
    cost_ratio = cost["ratio_kfac_to_adamw"] if cost else ratio(kfac["step_ms"], adamw["step_ms"])
    return {
        "batch": batch,
        "budget": budget_for(task, batch),
        "methods": methods,
        "kfac_over_adamw_steps": step_ratio,
        "kfac_over_adamw_seconds": step_ratio * cost_ratio if step_ratio is not None and cost_ratio else None,
        "kfac_over_sgd_steps": ratio(kfac["steps_median"], sgd["steps_median"]),
        "step_cost_ratio_to_sgd": cost["ratio_to_sgd"] if cost else None,
    }


def largest_within_2x(rows: list[dict[str, Any]], method: str, reference: float | None) -> int | None:
    """The largest batch B with S(b) <= 2 * reference * B0 / b at B and every smaller batch."""
    if reference is None:
        return None
    base, critical = rows[0]["batch"], None
    for row in rows:
        steps = row["methods"][method]["steps_median"]
        if steps is None or steps > 2 * reference * base / row["batch"]:
            break
        critical = row["batch"]
    return critical


def critical_batches(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = [rows[0]["methods"][m]["steps_median"] for m in METHODS]
    best = min((s for s in first if s is not None), default=None)
    largest = rows[-1]["batch"]
    result: dict[str, Any] = {}
    for method in METHODS:
        own = largest_within_2x(rows, method, rows[0]["methods"][method]["steps_median"])
        common = largest_within_2x(rows, method, best)
        result[method] = {
            "own": own,
            "common": common,
            "own_is_lower_bound": own == largest,
            "common_is_lower_bound": common == largest,
        }
    return result


CRITICAL_DEFINITION = (
    "critical batch size: the largest batch B such that at B and at every smaller batch b the median "
    "steps-to-target S(b) <= 2 * S(B0) * B0 / b (within 2x of perfect scaling from the smallest batch "
    "B0). 'own': S(B0) of the method itself; 'common': the best method's S(B0) (the plotted line). "
    "'>=' marks the largest batch tested (the true value may be larger)."
)


def task_summary(opts: Options, task: Task) -> dict[str, Any]:
    cost_path = os.path.join(opts.out, f"cost_{task.name}.json")
    costs = {c["batch"]: c for c in read_json(cost_path)} if os.path.exists(cost_path) else {}
    rows = [batch_row(opts, task, batch, costs.get(batch)) for batch in sorted(task.batches)]
    dist_path = os.path.join(opts.out, f"dist_{task.name}.json")
    dist = read_json(dist_path) if os.path.exists(dist_path) else None
    if dist is not None:
        dist = {k: v for k, v in dist.items() if k != "run_rank0"}
    ablation_path = os.path.join(opts.out, f"ablation_{task.name}.json")
    ablation = ablation_summary(read_json(ablation_path)) if os.path.exists(ablation_path) else None
    return {
        "task": task.name,
        "arch": task.arch,
        "target": task.target,
        "seeds": list(task.seeds),
        "budgets": {str(b): budget_for(task, b) for b in task.batches},
        "grids": task.grids,
        "kfac": task.kfac,
        "trials_per_method": {str(b): check_equal_trials(task, b) for b in task.batches},
        "rows": rows,
        "critical_batch": critical_batches(rows),
        "dist": dist,
        "ablation": ablation,
        "costs": [{k: v for k, v in c.items() if k != "per_round_ms"} for c in costs.values()],
    }


def ablation_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation rows with their steps and estimated seconds relative to the chosen setting at
    the same batch (seconds: steps ratio x the side-by-side step-cost ratio)."""
    chosen = {r["batch"]: r["steps_median"] for r in rows if r["variant"] == "chosen"}
    out = []
    for row in rows:
        steps = ratio(row["steps_median"], chosen.get(row["batch"]))
        cost = row["cost_over_chosen"]
        out.append({**row, "steps_over_chosen": steps, "seconds_over_chosen": steps * cost if steps else None})
    return out


def fmt(value: Any, spec: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def steps_cell(entry: dict[str, Any], budget: int) -> str:
    if not entry["steps_to_target"]:
        return "not run"
    per_seed = "/".join("miss" if s is None else str(s) for s in entry["steps_to_target"])
    median = entry["steps_median"]
    return f"**{median:g}** ({per_seed})" if median is not None else f">{budget} ({per_seed})"


def settings_cell(settings: dict[str, Any] | None) -> str:
    return "-" if settings is None else settings_label(settings)


def markdown_task(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"## {summary['task']} (target test accuracy {summary['target']})",
        "",
        "| batch | budget | SGD steps | AdamW steps | K-FAC steps | K-FAC/AdamW steps | K-FAC/AdamW seconds "
        "| K-FAC/SGD step cost | SGD | AdamW | K-FAC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        m = row["methods"]
        cost = row["step_cost_ratio_to_sgd"]
        lines.append(
            f"| {row['batch']} | {row['budget']} | "
            + " | ".join(steps_cell(m[k], row["budget"]) for k in METHODS)
            + f" | {fmt(row['kfac_over_adamw_steps'], '.2f')} | {fmt(row['kfac_over_adamw_seconds'], '.2f')}"
            + f" | {fmt(cost['kfac'] if cost else None, '.2f')} | "
            + " | ".join(settings_cell(m[k]["settings"]) for k in METHODS)
            + " |"
        )
    lines += [
        "",
        "Seconds to target (steps x median step time of the cost stage):",
        "",
        "| batch | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['batch']} | "
            + " | ".join(fmt(row["methods"][m]["seconds_to_target"], ".3g") for m in METHODS)
            + " |"
        )
    lines += [
        "",
        "Critical batch size (own / common reference): "
        + ", ".join(
            f"{LABELS[m]} {critical_cell(c, 'own')} / {critical_cell(c, 'common')}"
            for m, c in summary["critical_batch"].items()
        ),
        "",
    ]
    lines += markdown_dist(summary["dist"])
    lines += markdown_breakdown(summary)
    lines += markdown_kl(summary)
    lines += markdown_ablation(summary.get("ablation"))
    return lines


def markdown_breakdown(summary: dict[str, Any]) -> list[str]:
    """K-FAC's step in parts, as multiples of the SGD step at the same batch (cost stage)."""
    parts = ("forward_backward", "hook_statistics", "factors", "inverse", "precondition", "optimizer")
    costs = sorted(summary["costs"], key=lambda c: c["batch"])
    if not costs:
        return []
    lines = [
        "K-FAC's step in parts, in SGD steps at the same batch (medians of the interleaved rounds; "
        "hook statistics: K-FAC's forward/backward minus SGD's):",
        "",
        "| batch | " + " | ".join(p.replace("_", " ") for p in parts) + " | K-FAC step | AdamW step |",
        "|---|" + "---|" * (len(parts) + 2),
    ]
    for cost in costs:
        kfac = cost["fraction_of_sgd_step"]["kfac"]
        lines.append(
            f"| {cost['batch']} | "
            + " | ".join(fmt(kfac.get(p), ".2f") for p in parts)
            + f" | {fmt(cost['ratio_to_sgd']['kfac'], '.2f')} | {fmt(cost['ratio_to_sgd']['adamw'], '.2f')} |"
        )
    return [*lines, ""]


def markdown_kl(summary: dict[str, Any]) -> list[str]:
    """The KL clip's applied factor nu in the final K-FAC runs (1: the clip did not bind)."""
    rows = []
    for row in summary["rows"]:
        scales = [k for k in (row["methods"]["kfac"]["kl_clip_scale"] or []) if k]
        if scales:
            rows.append(
                f"| {row['batch']} | {fmt(statistics.median(k['median'] for k in scales), '.2f')} | "
                f"{fmt(statistics.median(k['early_median'] for k in scales), '.2f')} | "
                f"{fmt(min(k['min'] for k in scales), '.2g')} | "
                f"{fmt(statistics.median(k['bound_fraction'] for k in scales), '.0%')} |"
            )
    if not rows:
        return []
    return [
        "K-FAC's KL-clip factor nu (`kfac/kl_clip_scale`) in the final runs (medians over seeds):",
        "",
        "| batch | median nu | median nu, first 10% of steps | smallest nu | steps clipped |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def markdown_ablation(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "Ablation of K-FAC's choices at the largest batches (test split, the final seeds; cost: step "
        "time over the chosen setting's, side by side; seconds: steps ratio x cost ratio):",
        "",
        "| batch | variant | steps (per seed) | steps / chosen | step cost / chosen | seconds / chosen |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_seed = "/".join("miss" if s is None else str(s) for s in row["steps"])
        lines.append(
            f"| {row['batch']} | {row['variant']} | {fmt(row['steps_median'], '.0f', 'miss')} ({per_seed}) | "
            f"{fmt(row['steps_over_chosen'], '.2f')} | {fmt(row['cost_over_chosen'], '.2f')} | "
            f"{fmt(row['seconds_over_chosen'], '.2f')} |"
        )
    return [*lines, ""]


def critical_cell(entry: dict[str, Any], which: str) -> str:
    value = entry[which]
    if value is None:
        return "none"
    return f">={value}" if entry[f"{which}_is_lower_bound"] else str(value)


def markdown_dist(dist: dict[str, Any] | None) -> list[str]:
    if dist is None:
        return ["Distributed check: not run.", ""]
    return [
        f"Distributed check (K-FAC, {dist['world_size']} processes, same global batch): steps to target "
        f"{dist['steps_to_target_1_process']} (1 process) vs {dist['steps_to_target_n_processes']} "
        f"({'agree' if dist['agree'] else 'DISAGREE'}); max |parameter difference| after "
        f"{dist['check_steps']} steps {dist['max_param_diff_after_check_steps']:.2g} (largest |parameter| "
        f"{dist['max_param_abs_after_check_steps']:.2g}); ranks differ by "
        f"{dist['max_param_diff_between_ranks_final']:.2g} at the end.",
        "",
    ]


def write_markdown(summary: dict[str, Any], path: str) -> None:
    env = summary["environment"]
    lines = [
        "# Batch scaling: steps and seconds to target against the global batch size",
        "",
        f"Generated by `benchmarks/batch_scaling.py` ({summary['data']} data; torch {env['torch']}, "
        f"{env['threads']} thread(s); schedule {summary['schedule']}, warm-up {summary['warmup_fraction']:g} "
        "of the budget; no weight decay). Steps: median over seeds, per-seed values in brackets "
        "('miss': target not reached within the budget). Settings: the tuned choice per batch "
        "(same number of trials per method).",
        "",
        TIMING_NOTE,
        "",
        CRITICAL_DEFINITION,
        "",
    ]
    for task in summary["tasks"]:
        lines += markdown_task(task)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# --- plots ---------------------------------------------------------------------------------------
COLORS = {"sgd": "tab:blue", "adamw": "tab:orange", "kfac": "tab:green"}
PART_COLORS = {
    "data": "0.75",
    "forward_backward": "tab:blue",
    "hook_statistics": "tab:cyan",
    "factors": "tab:purple",
    "inverse": "tab:red",
    "precondition": "tab:olive",
    "kfac_other": "tab:pink",
    "optimizer": "tab:gray",
}


def plot_to_target(summary: dict[str, Any], quantity: str, path: str) -> None:
    """``quantity`` "steps_median" or "seconds_to_target" against the batch, log-log, one line per
    method; for steps, the perfect-scaling line (slope -1) through the best method at the smallest
    batch, the 2x band, and open triangles at the budget where the median seed missed the target."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    tasks = summary["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = task["rows"]
        for offset, method in zip((0.96, 1.0, 1.04), METHODS, strict=True):
            points = [(r["batch"], r["methods"][method][quantity]) for r in rows if r["methods"][method][quantity]]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", color=COLORS[method], label=LABELS[method])
            if quantity == "steps_median":  # missed targets: an open triangle at the budget
                missed = [
                    (r["batch"] * offset, r["budget"])
                    for r in rows
                    if r["methods"][method]["steps_to_target"] and r["methods"][method]["steps_median"] is None
                ]
                if missed:
                    ax.plot(
                        *zip(*missed, strict=True),
                        "^",
                        mfc="none",
                        color=COLORS[method],
                        ms=9,
                        label=f"{LABELS[method]}: missed (at budget)",
                    )
        first = [rows[0]["methods"][m][quantity] for m in METHODS if rows[0]["methods"][m][quantity]]
        if first and quantity == "steps_median":
            batches = [r["batch"] for r in rows]
            ideal = [min(first) * batches[0] / b for b in batches]
            ax.plot(batches, ideal, "k--", lw=1, label="perfect scaling")
            ax.plot(batches, [2 * v for v in ideal], "k:", lw=1, label="2x perfect scaling")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([r["batch"] for r in rows], [str(r["batch"]) for r in rows])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        # labels at 1, 2 and 5 of each decade only: every minor tick labelled overlaps
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(
            ticker.FuncFormatter(lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else "")
        )
        ax.set_xlabel("global batch size")
        ax.set_ylabel(
            "steps to target" if quantity == "steps_median" else "seconds to target on 1 process (cost-stage step time)"
        )
        ax.set_title(f"{task['task']}: test accuracy {task['target']}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no method reached the target", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_step_cost(summary: dict[str, Any], path: str) -> None:
    """Stacked bars: each method's step at each batch as parts of the SGD step at that batch."""
    import matplotlib.pyplot as plt

    tasks = [t for t in summary["tasks"] if t["costs"]]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    width = 0.27
    for ax, task in zip(axes[0], tasks, strict=True):
        costs = sorted(task["costs"], key=lambda c: c["batch"])
        labelled: set[str] = set()
        for i, cost in enumerate(costs):
            for j, method in enumerate(METHODS):
                bottom = 0.0
                for part, color in PART_COLORS.items():
                    value = cost["fraction_of_sgd_step"][method].get(part, 0.0)
                    if value <= 0:
                        continue
                    ax.bar(
                        i + (j - 1) * width,
                        value,
                        width,
                        bottom=bottom,
                        color=color,
                        edgecolor="white",
                        linewidth=0.3,
                        label=None if part in labelled else part.replace("_", " "),
                    )
                    labelled.add(part)
                    bottom += value
                ax.text(
                    i + (j - 1) * width,
                    bottom,
                    {"sgd": "S", "adamw": "A", "kfac": "K"}[method],
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(costs)), [str(c["batch"]) for c in costs])
        ax.set_xlabel("global batch size (bars: S = SGD, A = AdamW, K = K-FAC)")
        ax.set_ylabel("time per step / SGD step time")
        ax.set_title(f"{task['task']}: per-step cost (medians of interleaved rounds)")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_report(opts: Options, tasks: list[Task]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    summary = {
        "data": opts.data.source,
        "schedule": opts.schedule,
        "warmup_fraction": opts.warmup_fraction,
        "evals_per_budget": {task.name: opts.evals or task.evals for task in tasks},
        "weight_decay": WEIGHT_DECAY,
        "optimizers": OPTIMIZERS,
        "timing_note": TIMING_NOTE,
        "critical_batch_definition": CRITICAL_DEFINITION,
        "environment": environment(),
        "tasks": [task_summary(opts, task) for task in tasks],
    }
    write_json(os.path.join(opts.out, "summary.json"), summary)
    write_markdown(summary, os.path.join(opts.out, "RESULTS.md"))
    plot_to_target(summary, "steps_median", os.path.join(opts.out, "steps_to_target.png"))
    plot_to_target(summary, "seconds_to_target", os.path.join(opts.out, "seconds_to_target.png"))
    plot_step_cost(summary, os.path.join(opts.out, "step_cost.png"))
    log(f"report: {os.path.join(opts.out, 'RESULTS.md')}, summary.json, 3 plots")
    return summary


# --- command line --------------------------------------------------------------------------------
STAGES = ("tune", "seeds", "dist", "cost", "ablation", "report")


def parse_json_dict(text: str) -> dict[str, Any]:
    """A JSON object; string values naming torch dtypes ("torch.bfloat16") become the dtype."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    for key, item in value.items():
        if (
            isinstance(item, str)
            and item.startswith("torch.")
            and isinstance(getattr(torch, item[6:], None), torch.dtype)
        ):
            value[key] = getattr(torch, item[6:])
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    p.add_argument("--task", choices=("mlp", "cnn", "all"), default="all")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the task's list)")
    p.add_argument(
        "--budgets", type=parse_json_dict, help="steps per batch, e.g. '{\"4096\": 300}' (others keep defaults)"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the final runs (default 0 1)")
    p.add_argument(
        "--kfac", type=parse_json_dict, default={}, help="K-FAC constructor keywords (update the fixed ones)"
    )
    p.add_argument(
        "--grid", type=parse_json_dict, default={}, help='per-method grid rules, e.g. \'{"kfac": {"lrs": [0.1, 0.3]}}\''
    )
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--evals", type=int, help="evaluations per budget (default: the task's, MLP 100, CNN 50)")
    p.add_argument(
        "--full-runs",
        action="store_true",
        help="run every trial to its budget (default: end a run at the target; ties are then "
        "not broken by final accuracy)",
    )
    p.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), help="ablation variants (default: all)")
    p.add_argument("--ablation-batches", type=int, nargs="+", help="batches of the ablation (default: the 2 largest)")
    p.add_argument("--cost-rounds", type=int, default=5)
    p.add_argument("--cost-steps", type=int, default=20, help="steps per round (rounded up to whole K-FAC intervals)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run on generated data")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument(
        "--out", help=f"output folder (default {os.path.relpath(DEFAULT_OUT, ROOT)}; --smoke: a temporary one)"
    )
    p.add_argument("--force", action="store_true", help="redo runs whose results exist")
    return p.parse_args(argv)


def configure_tasks(args: argparse.Namespace) -> list[Task]:
    tasks = smoke_tasks() if args.smoke else default_tasks()
    chosen = list(tasks.values()) if args.task == "all" else [tasks[args.task]]
    for task in chosen:
        if args.batches:
            task.batches = tuple(sorted(args.batches))
        task.budgets.update({int(b): int(n) for b, n in (args.budgets or {}).items()})
        task.kfac.update(args.kfac)
        for method, rule in args.grid.items():
            if method not in METHODS:
                raise SystemExit(f"--grid: unknown method {method!r}")
            task.grids[method] = {**task.grids[method], **rule}
        if args.seeds:
            task.seeds = tuple(args.seeds)
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = configure_tasks(args)
    out = args.out or (tempfile.mkdtemp(prefix="batch_scaling_smoke_") if args.smoke else DEFAULT_OUT)
    data = synthetic_data() if args.smoke else fashion_data(args.data_dir)
    opts = Options(
        out=out,
        data=data,
        schedule=args.schedule,
        warmup_fraction=args.warmup_fraction,
        evals=4 if args.smoke else args.evals,
        force=args.force,
        stop_at_target=not args.full_runs,
        cost_rounds=2 if args.smoke else args.cost_rounds,
        cost_steps=4 if args.smoke else args.cost_steps,
        ablations=("momentum 0.9", "eigen, exact damping") if args.smoke else args.ablations,
        ablation_batches=tuple(args.ablation_batches) if args.ablation_batches else None,
    )
    stages = STAGES if args.stage == "all" else (args.stage,)
    log(
        f"batch scaling: stages {', '.join(stages)}; tasks {', '.join(t.name for t in tasks)}; "
        f"{data.source} data; {args.threads} thread(s); out {out}"
    )
    for stage in stages:
        if stage == "report":
            stage_report(opts, tasks)
            continue
        for task in tasks:
            stage_fn = {"tune": stage_tune, "seeds": stage_seeds, "dist": stage_dist, "cost": stage_cost}
            stage_fn.get(stage, stage_ablation)(opts, task)
    log("done")


if __name__ == "__main__":
    main()
