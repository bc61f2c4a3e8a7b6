"""Stale statistics (issue 5): adaptive per-layer inversion intervals vs fixed intervals on the
Fashion-MNIST CNN.

Every run: same seed, same data order, same model init, K-FAC through ``strategy="kfac_ddp"``
on one CPU process, SGD-momentum 0.9 as the base optimizer, a fixed number of optimizer steps,
no validation during the fit, test accuracy on the 10k test images at the end. Runs differ only
in the inversion schedule:

* ``fixed-N``: ``inv_update_freq=N``, ``factor_update_freq=F`` (``--fixed-factor-freq``, 1 by
  default: factors every step, as the adaptive run starts);
* ``adaptive``: starts at ``inv_update_freq=10``/``factor_update_freq=1`` (``--start-interval``)
  and lets ``StalenessConfig(threshold, min_interval, max_interval, growth, max_factor_interval,
  damped)`` grow/shrink each layer's interval (the factor interval follows at ratio 10).

``--damping`` sets how much the curvature matters: at 0.1 (the tuned value of the race in
``benchmarks/run.py``) only 0.05-7% of a layer's Kronecker eigenvalues exceed the damping (at
steps 50 and 300) and the preconditioner is nearly ``I / damping``, so stale factors cost little;
at 0.01 they cost accuracy at every longer interval.

Counts come from the engine (``preconditioner.layer_inversions``: layer inversions in total;
``preconditioner.inversions``: steps that inverted at least one layer), read at every training
batch end (the strategy drops its preconditioner at teardown).

    nice -n 10 /tmp/venv/bin/python benchmarks/staleness.py --steps 860 --seeds 0 \
        --fixed 10 20 50 --threshold 0.05 --min-interval 10 --max-interval 320

prints a table and writes ``benchmarks/results/staleness.json`` (``--out``). ``--append`` adds
to the runs already in the file (one run per process keeps each under a time limit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_kfac import KFACCallback
from lightning_kfac.engine.staleness import StalenessConfig

# the user-facing example module fashion_mnist.py lives in examples/, which is not a package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from fashion_mnist import FashionClassifier, FashionMNISTDataModule

HERE = os.path.dirname(os.path.abspath(__file__))

DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUT = os.path.join(HERE, "results", "staleness.json")


class InversionCounter(pl.Callback):
    """Keeps the engine's counters and (adaptive) each layer's interval history."""

    def __init__(self) -> None:
        self.layer_inversions = 0
        self.inversion_steps = 0
        self.factor_layer_updates = 0
        self.last_step_lr: float | None = None
        self.intervals: dict[str, list[tuple[int, int, float | None]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the rate this step will use (schedulers step before on_train_batch_end)
        self.last_step_lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        if pre is None:
            return
        self.layer_inversions = int(pre.layer_inversions)
        self.inversion_steps = int(pre.inversions)
        for name, tracker in (getattr(pre, "staleness_states", None) or {}).items():
            history = self.intervals.setdefault(name, [])
            entry = (int(trainer.global_step), int(tracker.inverse_interval), tracker.last_change)
            if not history or history[-1][1:] != entry[1:]:
                history.append(entry)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        if pre is not None and pre.layers:
            self.factor_layer_updates += len(pre.due_factor_layers())


class AnnealedClassifier(FashionClassifier):
    """The example classifier with its learning rate annealed to zero over the run (cosine, per
    step): the final accuracy then reads the end of a finished schedule, not a point on a
    constant-rate trajectory, and varies far less from seed to seed."""

    total_steps = 1

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, dm: FashionMNISTDataModule) -> float:
    model.eval()
    correct = total = 0
    for x, y in dm.test_dataloader():
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def run_one(
    label: str,
    seed: int,
    steps: int,
    lr: float,
    damping: float,
    kl_clip: float,
    inv_freq: int,
    factor_freq: int,
    adaptive: StalenessConfig | None,
    lr_schedule: str = "constant",
    data_dir: str = DATA_DIR,
    val_size: int = 5000,
) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True)
    dm = FashionMNISTDataModule(data_dir=data_dir, batch_size=128, val_size=val_size)
    dm.setup()
    model_class = AnnealedClassifier if lr_schedule == "cosine" else FashionClassifier
    model = model_class(arch="cnn", optimizer="sgd", lr=lr, momentum=0.9)
    model.total_steps = steps  # read by AnnealedClassifier only
    counter = InversionCounter()
    kfac = KFACCallback(
        damping=damping,
        factor_update_freq=factor_freq,
        inv_update_freq=inv_freq,
        kl_clip=kl_clip,
        adaptive=adaptive,
        log=False,
        progress_bar=False,
        summary=False,
    )
    trainer = pl.Trainer(
        strategy="kfac_ddp",
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[kfac, counter],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    acc = test_accuracy(model, dm)
    final_intervals = {n: h[-1][1] for n, h in counter.intervals.items()}
    return {
        "label": label,
        "seed": seed,
        "steps": int(trainer.global_step),
        "lr": lr,
        "lr_schedule": lr_schedule,
        "last_step_lr": counter.last_step_lr,
        "data_dir": data_dir,
        "damping": damping,
        "kl_clip": kl_clip,
        "inv_update_freq": inv_freq,
        "factor_update_freq": factor_freq,
        "adaptive": adaptive.state_dict() if adaptive is not None else None,
        "layer_inversions": counter.layer_inversions,
        "inversion_steps": counter.inversion_steps,
        "factor_layer_updates": counter.factor_layer_updates,
        "test_acc": acc,
        "wall_s": wall,
        "final_intervals": final_intervals,
        "interval_history": dict(counter.intervals),
    }


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':<22} {'seed':>4} {'steps':>5} {'layer inv':>9} {'inv steps':>9} {'factor upd':>10} "
        f"{'test acc':>8} {'wall s':>7}  final intervals"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        fi = ",".join(str(v) for v in r["final_intervals"].values()) if r["final_intervals"] else ""
        lines.append(
            f"{r['label']:<22} {r['seed']:>4} {r['steps']:>5} {r['layer_inversions']:>9} {r['inversion_steps']:>9} "
            f"{r['factor_layer_updates']:>10} {r['test_acc']:>8.4f} {r['wall_s']:>7.1f}  {fi}"
        )
    return "\n".join(lines)


def _setting(run: dict[str, Any]) -> tuple:
    """Runs compare only within one training setting."""
    return (
        run["steps"],
        run["damping"],
        run.get("lr_schedule", "constant"),
        run["lr"],
        run["kl_clip"],
        run.get("data_dir", DATA_DIR),
    )


def verdicts(
    runs: list[dict[str, Any]], tolerance: float = 0.003, target: float = 0.4, min_seeds: int = 2
) -> list[dict[str, Any]]:
    """Issue 5's measurement, per adaptive schedule, on seed means within one setting. The
    reference is the cheapest fixed interval whose mean accuracy is at least the adaptive
    schedule's minus ``tolerance`` (the fixed schedule that reaches the same accuracy, with the
    tolerance's benefit of the doubt), each pair compared on the seeds both ran (at least
    ``min_seeds`` of them). The target holds when the adaptive schedule makes at least ``target``
    fewer layer inversions and is itself within ``tolerance`` of the reference's accuracy; when
    the reference is more accurate than that, the fixed interval that would match lies between
    the reference and the next cheaper one run (or beyond the cheapest): no verdict."""
    groups: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(_setting(run), {}).setdefault(run["label"], {})[run["seed"]] = run

    def mean(of: dict[int, dict[str, Any]], seeds: list[int], key: str) -> float:
        return sum(of[s][key] for s in seeds) / len(seeds)

    out = []
    for setting, labels in groups.items():
        fixed = {name: seeds for name, seeds in labels.items() if next(iter(seeds.values()))["adaptive"] is None}
        for label, seeds in labels.items():
            if label in fixed:
                continue
            own = sorted(seeds)
            entry: dict[str, Any] = {
                "setting": dict(
                    zip(("steps", "damping", "lr_schedule", "lr", "kl_clip", "data_dir"), setting, strict=True)
                ),
                "adaptive": label,
                "seeds": own,
                "inversions": mean(seeds, own, "layer_inversions"),
                "test_acc": mean(seeds, own, "test_acc"),
                "reference": None,
                "ratio": None,
                "met": False,
                "accuracy_kept": None,
            }
            reaching = []
            for name, other in fixed.items():
                common = sorted(set(own) & set(other))
                if len(common) < min_seeds:
                    continue
                acc, ref_acc = mean(seeds, common, "test_acc"), mean(other, common, "test_acc")
                if ref_acc >= acc - tolerance:
                    reaching.append((mean(other, common, "layer_inversions"), name, common, acc, ref_acc))
            if reaching:
                ref_inversions, name, common, acc, ref_acc = min(reaching)
                ratio = mean(seeds, common, "layer_inversions") / ref_inversions
                kept = acc >= ref_acc - tolerance
                entry.update(
                    reference=name,
                    reference_seeds=common,
                    ratio=ratio,
                    accuracy_kept=kept,
                    met=kept and ratio <= 1.0 - target,
                    reference_inversions=ref_inversions,
                    reference_acc=ref_acc,
                    acc_on_reference_seeds=acc,
                )
            out.append(entry)
    return out


def verdict_table(entries: list[dict[str, Any]], target: float = 0.4) -> str:
    lines = []
    for e in entries:
        st = e["setting"]
        head = (
            f"{st['steps']} steps, damping {st['damping']:g}, {st['lr_schedule']} lr | {e['adaptive']} "
            f"(seeds {e['seeds']}): {e['inversions']:.1f} inversions, acc {e['test_acc']:.4f}"
        )
        if e["reference"] is None:
            lines.append(head + " | no fixed interval reaches it")
        else:
            outcome = "met" if e["met"] else "not met"
            if not e["accuracy_kept"]:
                outcome = "no verdict: over the tolerance below the reference; the matching fixed interval was not run"
            lines.append(
                head + f" | reference {e['reference']} (seeds {e['reference_seeds']}): "
                f"{e['reference_inversions']:.0f} inversions, acc {e['reference_acc']:.4f} | inversion ratio "
                f"{e['ratio']:.2f} (target <= {1 - target:.2f}): {outcome}"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=860)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fixed", type=int, nargs="*", default=[10, 20, 50])
    p.add_argument(
        "--fixed-factor-freq",
        type=int,
        default=0,
        help="factor_update_freq of the fixed runs; 0: inv_update_freq // 10 (the adaptive run's ratio)",
    )
    p.add_argument("--no-adaptive", action="store_true")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.05])
    p.add_argument("--min-interval", type=int, default=10)
    p.add_argument("--max-interval", type=int, default=320)
    p.add_argument(
        "--max-factor-interval",
        type=int,
        default=0,
        help="cap on the adaptive factor-update interval (0: none, it follows at ratio 10)",
    )
    p.add_argument("--growth", type=float, default=2.0, help="adaptive interval growth factor")
    p.add_argument(
        "--start-interval",
        type=int,
        default=10,
        help="the adaptive run's starting inv_update_freq (factor_update_freq: a tenth of it)",
    )
    p.add_argument(
        "--probe-after",
        type=int,
        default=0,
        help="StalenessConfig(probe_after=K): the K-th change in a row in the hold band grows the interval "
        "(0: no probes)",
    )
    p.add_argument(
        "--raw-change",
        action="store_true",
        help="measure changes of the raw factors, not of the damped ones (StalenessConfig(damped=False))",
    )
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="cosine: anneal the learning rate to 0 over --steps (per step)",
    )
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--kl-clip", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=DATA_DIR, help="folder of the Fashion-MNIST IDX files")
    p.add_argument(
        "--val-size", type=int, default=5000, help="training images held out (unused by the fit, kept for the split)"
    )
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--append", action="store_true", help="add to the runs already in --out")
    p.add_argument(
        "--verdicts-only", action="store_true", help="run nothing: print the issue-5 verdicts of the runs in --out"
    )
    args = p.parse_args()
    if args.verdicts_only:
        with open(args.out) as f:
            print(verdict_table(verdicts(json.load(f)["runs"])))
        return

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available.*")
    runs: list[dict[str, Any]] = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            runs = json.load(f)["runs"]

    def save() -> None:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "torch_threads": args.threads, "runs": runs}, f, indent=1)

    suffix = "/cos" if args.lr_schedule == "cosine" else ""
    for seed in args.seeds:
        for n in args.fixed:
            ff = args.fixed_factor_freq or max(1, n // 10)
            runs.append(
                run_one(
                    f"fixed-{n}/f{ff}" + suffix,
                    seed,
                    args.steps,
                    args.lr,
                    args.damping,
                    args.kl_clip,
                    n,
                    ff,
                    None,
                    args.lr_schedule,
                    args.data_dir,
                    args.val_size,
                )
            )
            print(table(runs[-1:]), flush=True)
            save()
        if not args.no_adaptive:
            for th in args.threshold:
                cap = args.max_factor_interval or None
                cfg = StalenessConfig(
                    threshold=th,
                    min_interval=args.min_interval,
                    max_interval=args.max_interval,
                    growth=args.growth,
                    max_factor_interval=cap,
                    damped=not args.raw_change,
                    probe_after=args.probe_after or None,
                )
                label = (
                    f"adaptive-t{th:g}[{args.min_interval},{args.max_interval}]"
                    + (f"/f<={cap}" if cap else "")
                    + (f"/x{args.growth:g}" if args.growth != 2.0 else "")
                    + ("/raw" if args.raw_change else "/damped")
                    + (f"/probe{args.probe_after}" if args.probe_after else "")
                    + (f"/start{args.start_interval}" if args.start_interval != 10 else "")
                    + suffix
                )
                start = args.start_interval
                runs.append(
                    run_one(
                        label,
                        seed,
                        args.steps,
                        args.lr,
                        args.damping,
                        args.kl_clip,
                        start,
                        max(1, start // 10),
                        cfg,
                        args.lr_schedule,
                        args.data_dir,
                        args.val_size,
                    )
                )
                print(table(runs[-1:]), flush=True)
                save()
    print(table(runs))
    print(verdict_table(verdicts(runs)))
    save()


if __name__ == "__main__":
    main()
