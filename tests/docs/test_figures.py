"""Every figure the prose quotes from a benchmark is the stored result, rounded as printed, and a
shown output is what the code prints. A re-measured result that changes a figure fails here
until the page says the new figure.

A quoted figure is a ``Figure``: the page, the text as it stands there (whitespace aside), and
the stored value of every number in that text, in order. Each number must equal its value
rounded to the decimals the text prints (``0.39`` is 0.385 to 0.395; ``79%`` a fraction of
0.785 to 0.795 given as 78.5 to 79.5). Tables quoted by hand are checked cell by cell the same
way. The tables a page includes from a ``RESULTS.md`` are the stored results themselves.

Figures on the pages that no stored result holds (measured once and not stored: the demo's other
seeds and settings, the eigenvalue shares of the 2-epoch staleness runs, CPU-thread differences,
earlier step-cost runs) say so where they stand.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import ROOT, script_env
from tests.docs import pages

RESULTS = os.path.join(ROOT, "benchmarks", "results")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


# --- the stored results -----------------------------------------------------------------------------
@functools.cache
def _json(path: str) -> Any:
    with open(os.path.join(RESULTS, path)) as f:
        return json.load(f)


def task(name: str) -> dict:
    return next(t for t in _json("batch_scaling/summary.json")["tasks"] if t["task"] == name)


def row(name: str, batch: int) -> dict:
    return next(r for r in task(name)["rows"] if r["batch"] == batch)


def batches(name: str) -> list[int]:
    return [r["batch"] for r in task(name)["rows"]]


def steps(name: str, batch: int, method: str) -> float | None:
    return row(name, batch)["methods"][method]["steps_median"]


def kfac_over_adamw(name: str, batch: int, what: str) -> float:
    return row(name, batch)[f"kfac_over_adamw_{what}"]


def cost(name: str, batch: int) -> dict:
    return next(c for c in task(name)["costs"] if c["batch"] == batch)


def step_cost_over_adamw(name: str, batch: int) -> float:
    return cost(name, batch)["ratio_kfac_to_adamw"]


def ablation(name: str, batch: int, variant: str) -> dict:
    return next(a for a in task(name)["ablation"] if a["batch"] == batch and a["variant"] == variant)


def b128_ablation(variant: str) -> dict:
    return next(a for a in _json("batch_scaling/ablation_mlp_b128.json") if a["variant"] == variant)


def kl(name: str, batch: int, key: str, over_seeds: Callable = statistics.median) -> float:
    return over_seeds(s[key] for s in row(name, batch)["methods"]["kfac"]["kl_clip_scale"])


def trial(name: str, batch: int, lr: float, damping: float) -> int:
    trials = row(name, batch)["methods"]["kfac"]["trials"]
    return next(t["steps_to_target"] for t in trials if t["settings"] == {"lr": lr, "damping": damping})


def setting(name: str, batch: int, key: str) -> float:
    return row(name, batch)["methods"]["kfac"]["settings"][key]


def span(values) -> list[float]:
    values = list(values)
    return [min(values), max(values)]


def pct(value: float) -> float:
    return 100 * value


MLP_LARGE = [2048, 4096, 16384]


# --- quoted figures ---------------------------------------------------------------------------------
@dataclass
class Figure:
    page: str
    text: str
    values: Callable[[], list[float]]
    holds: Callable[[], bool] = lambda: True  # a fact the text states without a number

    @property
    def id(self) -> str:
        return f"{self.page}: {self.text[:60]}"


def _figures() -> list[Figure]:
    mlp_ratio = [kfac_over_adamw("mlp", b, "steps") for b in batches("mlp")]
    cnn = batches("cnn")
    headline = [
        Figure(
            "README.md",
            "On the MLP K-FAC needed 0.30-0.39x AdamW's steps at every batch from 128 to 16384, and 0.54x / "
            "0.62x its seconds at batches 4096 / 16384; at batch 128, where its step cost 7.89x AdamW's, it "
            "took 3.02x the seconds. Its critical batch size was 2048, AdamW's 512. On the CNN it needed "
            "0.44-0.64x AdamW's steps but 1.17-1.55x its seconds",
            lambda: [
                *span(mlp_ratio),
                min(batches("mlp")),
                max(batches("mlp")),
                kfac_over_adamw("mlp", 4096, "seconds"),
                kfac_over_adamw("mlp", 16384, "seconds"),
                4096,
                16384,
                128,
                step_cost_over_adamw("mlp", 128),
                kfac_over_adamw("mlp", 128, "seconds"),
                task("mlp")["critical_batch"]["kfac"]["own"],
                task("mlp")["critical_batch"]["adamw"]["own"],
                *span(kfac_over_adamw("cnn", b, "steps") for b in cnn),
                *span(kfac_over_adamw("cnn", b, "seconds") for b in cnn),
            ],
        ),
        Figure("README.md", "medians over 2 seeds", lambda: [len(task("mlp")["seeds"])]),
    ]
    tuning = [
        Figure(
            "tuning.md",
            "MLP 0.30-0.39x AdamW's steps at every batch from 128 to 16384",
            lambda: [*span(mlp_ratio), min(batches("mlp")), max(batches("mlp"))],
        ),
        Figure(
            "tuning.md",
            "At batch 128 the MLP's K-FAC step cost 7.9x AdamW's",
            lambda: [128, step_cost_over_adamw("mlp", 128)],
        ),
        Figure(
            "tuning.md",
            "K-FAC took 3.0x AdamW's seconds; at 512, 1.19x; from batch 2048 on",
            lambda: [kfac_over_adamw("mlp", 128, "seconds"), 512, kfac_over_adamw("mlp", 512, "seconds"), 2048],
        ),
        Figure(
            "tuning.md",
            "K-FAC's step cost 1.6-2.2x AdamW's and it took 0.54-0.75x the seconds",
            lambda: [
                *span(step_cost_over_adamw("mlp", b) for b in MLP_LARGE),
                *span(kfac_over_adamw("mlp", b, "seconds") for b in MLP_LARGE),
            ],
        ),
        Figure(
            "tuning.md",
            "halving the steps) was 4x AdamW's",
            lambda: [task("mlp")["critical_batch"]["kfac"]["own"] / task("mlp")["critical_batch"]["adamw"]["own"]],
        ),
        Figure(
            "tuning.md",
            "K-FAC needed 0.44-0.64x AdamW's steps",
            lambda: span(kfac_over_adamw("cnn", b, "steps") for b in cnn),
        ),
        Figure(
            "tuning.md",
            "step cost 1.9-3.1x AdamW's, and it was slower in seconds at every batch measured (1.17-1.55x)",
            lambda: [
                *span(step_cost_over_adamw("cnn", b) for b in cnn),
                *span(kfac_over_adamw("cnn", b, "seconds") for b in cnn),
            ],
            holds=lambda: all(kfac_over_adamw("cnn", b, "seconds") > 1 for b in cnn),
        ),
        Figure(
            "tuning.md",
            "For the CNN at batch 4096, `factor_samples=256` kept the steps (75 against 72-75) at "
            "0.57x the step cost, which takes K-FAC to about 0.71x AdamW's seconds there",
            lambda: [
                4096,
                256,
                ablation("cnn", 4096, "factor_samples 256")["steps_median"],
                *span(ablation("cnn", 4096, "chosen")["steps"]),
                ablation("cnn", 4096, "factor_samples 256")["cost_over_chosen"],
                kfac_over_adamw("cnn", 4096, "seconds")
                * ablation("cnn", 4096, "factor_samples 256")["seconds_over_chosen"],
            ],
        ),
        Figure(
            "tuning.md",
            "Tuned values on the MLP: lr 0.25 with damping 0.03 at batches 2048-16384, lr 0.1 "
            "with damping 0.03 at 512, lr 0.1 with damping 0.1 at 128.",
            lambda: [
                setting("mlp", 2048, "lr"),
                setting("mlp", 2048, "damping"),
                2048,
                16384,
                setting("mlp", 512, "lr"),
                setting("mlp", 512, "damping"),
                512,
                setting("mlp", 128, "lr"),
                setting("mlp", 128, "damping"),
                128,
            ],
            holds=lambda: all(
                row("mlp", b)["methods"]["kfac"]["settings"] == {"lr": 0.25, "damping": 0.03} for b in MLP_LARGE
            ),
        ),
        Figure(
            "tuning.md",
            "damping 0.1 instead of 0.03 needed 1.3-1.5x the steps at batches 2048-16384 "
            "(lr 0.25), 0.3 instead of 0.1 needed 1.4-1.9x at 128",
            lambda: [
                0.1,
                0.03,
                *span(trial("mlp", b, 0.25, 0.1) / trial("mlp", b, 0.25, 0.03) for b in MLP_LARGE),
                2048,
                16384,
                0.25,
                0.3,
                0.1,
                *span(trial("mlp", 128, lr, 0.3) / trial("mlp", 128, lr, 0.1) for lr in (0.05, 0.1)),
                128,
            ],
        ),
        Figure(
            "tuning.md",
            "In the final MLP runs at batches 2048-16384 (`kl_clip=0.1`), nu was 1 on most steps "
            "and bound on 15-31% of them (down to 0.26), yet without the clip the same settings missed the "
            "target at 4096 and 16384",
            lambda: [
                2048,
                16384,
                task("mlp")["kfac"]["kl_clip"],
                *[kl("mlp", MLP_LARGE[0], "median")],
                *span(pct(kl("mlp", b, "bound_fraction")) for b in MLP_LARGE),
                min(kl("mlp", b, "min", min) for b in MLP_LARGE),
                4096,
                16384,
            ],
            holds=lambda: (
                all(kl("mlp", b, "median") == 1.0 for b in MLP_LARGE)
                and all(ablation("mlp", b, "no KL clip")["steps_median"] is None for b in (4096, 16384))
            ),
        ),
        Figure(
            "tuning.md",
            "At batch 128 (`kl_clip=0.01`) it bound on 79% of the steps (median 0.75)",
            lambda: [
                128,
                b128_ablation("chosen")["kfac"]["kl_clip"],
                pct(kl("mlp", 128, "bound_fraction")),
                kl("mlp", 128, "median"),
            ],
        ),
        Figure(
            "tuning.md",
            "Momentum 0.9 needed 4.8x the steps at batch 4096 and 3.3x at 16384",
            lambda: [
                0.9,
                ablation("mlp", 4096, "momentum 0.9")["steps_over_chosen"],
                4096,
                ablation("mlp", 16384, "momentum 0.9")["steps_over_chosen"],
                16384,
            ],
        ),
        Figure(
            "tuning.md",
            "needed 1.24-1.32x the steps of SGD underneath (still 0.43-0.48x AdamW alone)",
            lambda: [
                *span(ablation("mlp", b, "AdamW underneath")["steps_over_chosen"] for b in (4096, 16384)),
                *span(
                    ablation("mlp", b, "AdamW underneath")["steps_median"] / steps("mlp", b, "adamw")
                    for b in (4096, 16384)
                ),
            ],
        ),
        Figure(
            "tuning.md",
            "The eigen method with the same factored damping took as many steps at 1.13-1.28x the step cost",
            lambda: span(ablation("mlp", b, "eigen, factored damping")["cost_over_chosen"] for b in (4096, 16384)),
            holds=lambda: all(
                ablation("mlp", b, "eigen, factored damping")["steps_over_chosen"] == 1.0 for b in (4096, 16384)
            ),
        ),
        Figure(
            "tuning.md",
            "it needed 3.7-4.1x the steps",
            lambda: span(ablation("mlp", b, "eigen, exact damping")["steps_over_chosen"] for b in (4096, 16384)),
        ),
        Figure(
            "tuning.md",
            "At batch 128 (same damping 0.1) the picture is the same: eigen with factored damping "
            "1.00x the steps at 2.3x the step cost, with exact damping 2.25x the steps",
            lambda: [
                128,
                setting("mlp", 128, "damping"),
                b128_ablation("eigen, factored damping")["steps_median"] / b128_ablation("chosen")["steps_median"],
                b128_ablation("eigen, factored damping")["cost_over_chosen"],
                b128_ablation("eigen, exact damping")["steps_median"] / b128_ablation("chosen")["steps_median"],
            ],
        ),
        Figure(
            "tuning.md",
            "Every step: 0.83-0.94x the steps at 1.4-1.7x the cost. The defaults (factors every "
            "2, inversions every 10): 1.10-1.17x the steps at about the same cost on this MLP, whose "
            "inversions are cheap (the CNN at 4096: 1.16x at 1.04x)",
            lambda: [
                *span(ablation("mlp", b, "factors 1, inversions 1")["steps_over_chosen"] for b in (4096, 16384)),
                *span(ablation("mlp", b, "factors 1, inversions 1")["cost_over_chosen"] for b in (4096, 16384)),
                2,
                10,
                *span(
                    ablation("mlp", b, "factors 2, inversions 10 (the defaults)")["steps_over_chosen"]
                    for b in (4096, 16384)
                ),
                4096,
                ablation("cnn", 4096, "factors 2, inversions 10 (the defaults)")["steps_over_chosen"],
                ablation("cnn", 4096, "factors 2, inversions 10 (the defaults)")["cost_over_chosen"],
            ],
        ),
        Figure(
            "tuning.md",
            "Factors every 5, inversions every 10: 1.21-1.32x the steps at 0.71-0.82x the cost.",
            lambda: [
                5,
                10,
                *span(ablation("mlp", b, "factors 5, inversions 10")["steps_over_chosen"] for b in (4096, 16384)),
                *span(ablation("mlp", b, "factors 5, inversions 10")["cost_over_chosen"] for b in (4096, 16384)),
            ],
        ),
        Figure(
            "tuning.md",
            "on the MLP 1.00-1.03x the steps at 0.72-0.73x the step cost (batches 4096 and "
            "16384), on the CNN 1.02x the steps at 0.57x (batch 4096)",
            lambda: [
                *span(ablation("mlp", b, "factor_samples 256")["steps_over_chosen"] for b in (4096, 16384)),
                *span(ablation("mlp", b, "factor_samples 256")["cost_over_chosen"] for b in (4096, 16384)),
                4096,
                16384,
                ablation("cnn", 4096, "factor_samples 256")["steps_over_chosen"],
                ablation("cnn", 4096, "factor_samples 256")["cost_over_chosen"],
                4096,
            ],
        ),
        Figure(
            "tuning.md",
            "(5 of the 13 SGD steps a K-FAC step cost at batch 128 with inversions every 2 steps)",
            lambda: [
                cost("mlp", 128)["fraction_of_sgd_step"]["kfac"]["inverse"],
                cost("mlp", 128)["ratio_to_sgd"]["kfac"],
                128,
                task("mlp")["kfac"]["inv_update_freq"],
            ],
        ),
    ]
    scaling = [
        Figure(
            "results/batch_scaling/index.md",
            "(4, or 2 for the CNN at 4096; K-FAC's damping counts as a trial), then run on 2 seeds on the test split",
            lambda: [
                task("mlp")["trials_per_method"]["4096"],
                task("cnn")["trials_per_method"]["4096"],
                4096,
                len(task("mlp")["seeds"]),
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "K-FAC settings: factors and inversions every 2 steps, KL clip 0.1 "
            "(0.01 at batch 128), damping and learning rate tuned per batch (damping 0.03, 0.1 on the MLP at 128; "
            "lr 0.1-0.25). At the largest batch of each task, 2 processes with the same global batch reached the "
            "target in the same number of steps as one (MLP 30 and 30 at 16384, CNN 72 and 72 at 4096).",
            lambda: [
                task("mlp")["kfac"]["factor_update_freq"],
                task("mlp")["kfac"]["kl_clip"],
                b128_ablation("chosen")["kfac"]["kl_clip"],
                128,
                setting("mlp", 4096, "damping"),
                setting("mlp", 128, "damping"),
                128,
                *span(setting(n, b, "lr") for n in ("mlp", "cnn") for b in batches(n)),
                task("mlp")["dist"]["world_size"],
                task("mlp")["dist"]["steps_to_target_1_process"],
                task("mlp")["dist"]["steps_to_target_n_processes"],
                max(batches("mlp")),
                task("cnn")["dist"]["steps_to_target_1_process"],
                task("cnn")["dist"]["steps_to_target_n_processes"],
                max(batches("cnn")),
            ],
            holds=lambda: (
                task("mlp")["kfac"]["inv_update_freq"] == 2
                and task("mlp")["dist"]["agree"]
                and task("cnn")["dist"]["agree"]
            ),
        ),
        Figure(
            "results/batch_scaling/index.md",
            "| met: 0.33x (4096), 0.39x (16384) | missed: 0.64x (4096) |",
            lambda: [
                kfac_over_adamw("mlp", 4096, "steps"),
                4096,
                kfac_over_adamw("mlp", 16384, "steps"),
                16384,
                kfac_over_adamw("cnn", 4096, "steps"),
                4096,
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "| met at 4096 (0.54x); missed at 16384 (0.62x; about 0.45x with "
            "`factor_samples=256`, from the ablation's steps and side-by-side cost) | missed: 1.22x; about 0.71x "
            "with `factor_samples=256` (same steps at 0.57x the step cost, from the ablation) |",
            lambda: [
                4096,
                kfac_over_adamw("mlp", 4096, "seconds"),
                16384,
                kfac_over_adamw("mlp", 16384, "seconds"),
                kfac_over_adamw("mlp", 16384, "seconds")
                * ablation("mlp", 16384, "factor_samples 256")["seconds_over_chosen"],
                256,
                kfac_over_adamw("cnn", 4096, "seconds"),
                kfac_over_adamw("cnn", 4096, "seconds")
                * ablation("cnn", 4096, "factor_samples 256")["seconds_over_chosen"],
                256,
                ablation("cnn", 4096, "factor_samples 256")["cost_over_chosen"],
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "| met: 2048 against 512 | missed: 512 against 512 (batches 128, 512, 4096 only) |",
            lambda: [
                task("mlp")["critical_batch"]["kfac"]["own"],
                task("mlp")["critical_batch"]["adamw"]["own"],
                task("cnn")["critical_batch"]["kfac"]["own"],
                task("cnn")["critical_batch"]["adamw"]["own"],
                *batches("cnn"),
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "| met: 0.38x (3.0x the seconds) | met, at the limit: 0.50x (1.55x the seconds) |",
            lambda: [
                kfac_over_adamw("mlp", 128, "steps"),
                kfac_over_adamw("mlp", 128, "seconds"),
                kfac_over_adamw("cnn", 128, "steps"),
                kfac_over_adamw("cnn", 128, "seconds"),
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "Its K-FAC step was 1.98 SGD steps at batch 4096, of which the "
            "factor statistics computed in the hooks were 0.98",
            lambda: [
                cost("cnn", 4096)["ratio_to_sgd"]["kfac"],
                4096,
                cost("cnn", 4096)["fraction_of_sgd_step"]["kfac"]["hook_statistics"],
            ],
        ),
        Figure(
            "results/batch_scaling/index.md",
            "inversions and preconditioning were under 0.02",
            lambda: [0.02],
            holds=lambda: all(
                cost("cnn", 4096)["fraction_of_sgd_step"]["kfac"][p] < 0.02 for p in ("inverse", "precondition")
            ),
        ),
        Figure(
            "results/batch_scaling/index.md",
            "the batch-4096 tuning had 2 trials per method (lr 0.1 beat 0.25, "
            "damping 0.03 only), and the KL clip bound on 26-31% of K-FAC's steps with nu down to 0.02-0.06 (the "
            "MLP's runs: down to 0.26-0.35)",
            lambda: [
                4096,
                task("cnn")["trials_per_method"]["4096"],
                setting("cnn", 4096, "lr"),
                0.25,
                setting("cnn", 4096, "damping"),
                *span(pct(s["bound_fraction"]) for s in row("cnn", 4096)["methods"]["kfac"]["kl_clip_scale"]),
                *span(s["min"] for s in row("cnn", 4096)["methods"]["kfac"]["kl_clip_scale"]),
                kl("mlp", 16384, "min", min),
                kl("mlp", 4096, "min", min),
            ],
        ),
    ]
    return headline + tuning + scaling + _staleness_figures() + _step_cost_figures()


# --- the stale-statistics runs ----------------------------------------------------------------------
def stale_runs(label: str, steps: int, damping: float) -> list[dict]:
    runs = [
        r
        for r in _json("staleness.json")["runs"]
        if r["label"] == label and r["steps"] == steps and r["damping"] == damping
    ]
    assert runs, (label, steps, damping)
    return runs


def stale_mean(label: str, key: str, steps: int = 2345, damping: float = 0.01, seeds=None) -> float:
    runs = [r for r in stale_runs(label, steps, damping) if seeds is None or r["seed"] in seeds]
    return statistics.mean(r[key] for r in runs)


COSINE = {  # the rows of the 5-epoch cosine table, and the runs behind each
    "fixed 10 (factors every step)": "fixed-10/f1/cos",
    "fixed 25 (every 2)": "fixed-25/f2/cos",
    "fixed 50 (every 5)": "fixed-50/f5/cos",
    "fixed 100 (every 10)": "fixed-100/f10/cos",
    "fixed 200 (every 20)": "fixed-200/f20/cos",
    "adaptive from 10, [10, 640]": "adaptive-t0.1[10,640]/f<=10/damped/cos",
    "adaptive from 10, [10, 640], `probe_after=2`": "adaptive-t0.1[10,640]/f<=10/damped/probe2/cos",
    "adaptive from 100, [100, 640]": "adaptive-t0.1[100,640]/f<=10/damped/start100/cos",
    "adaptive from 100, [100, 640], `probe_after=2`": "adaptive-t0.1[100,640]/f<=10/damped/probe2/start100/cos",
}
CONSTANT_RATE = {  # the rows of the 2-epoch constant-rate table
    "fixed 10 (factors every step)": "fixed-10/f1",
    "fixed 50 (every 5)": "fixed-50/f5",
    "fixed 100 (every 10)": "fixed-100/f10",
    "fixed 200 (every 20)": "fixed-200/f20",
    "adaptive, change of the raw factors": "adaptive-t0.1[10,640]/f<=10/raw",
    "adaptive, change of the damped factors (default)": "adaptive-t0.1[10,640]/f<=10/damped",
}
PROBE_10, PROBE_100 = (
    COSINE["adaptive from 10, [10, 640], `probe_after=2`"],
    COSINE["adaptive from 100, [100, 640], `probe_after=2`"],
)
PLAIN_10, PLAIN_100 = COSINE["adaptive from 10, [10, 640]"], COSINE["adaptive from 100, [100, 640]"]


def _constant_rate_groups() -> list[list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in _json("staleness.json")["runs"]:
        if r["steps"] == 860:
            groups.setdefault((r["label"], r["damping"]), []).append(r)
    return list(groups.values())


def seeds_of(label: str, steps: int = 2345, damping: float = 0.01) -> set[int]:
    return {r["seed"] for r in stale_runs(label, steps, damping)}


def fewer(label: str, than: str, **kwargs) -> float:
    return pct(1 - stale_mean(label, "layer_inversions", **kwargs) / stale_mean(than, "layer_inversions", **kwargs))


def _staleness_figures() -> list[Figure]:
    common_10 = seeds_of(PROBE_10) & seeds_of(PLAIN_10)
    common_100 = seeds_of(PROBE_100) & seeds_of(PLAIN_100)
    spreads = [
        max(r["test_acc"] for r in stale_runs(label, 2345, 0.01))
        - min(r["test_acc"] for r in stale_runs(label, 2345, 0.01))
        for label in COSINE.values()
    ]
    early = []
    for r in stale_runs("adaptive-t0.1[10,640]/f<=10/damped", 860, 0.01):
        inversions = [entry[0] for history in r["interval_history"].values() for entry in history]
        early.append(pct(sum(step <= 100 for step in inversions) / len(inversions)))
    page = "benchmarks.md"
    return [
        Figure(
            page,
            "where a schedule's accuracy ranges over 0.2-0.6 points across seeds (1.1 for one)",
            lambda: [*span(sorted(pct(s) for s in spreads)[:-1]), pct(max(spreads))],
        ),
        Figure(
            page,
            "from 10, fixed 10 is the only fixed interval that reaches 0.9025 (fixed 50 is 0.33 points "
            "below), so 90% fewer (48% fewer than fixed 50 while more accurate)",
            lambda: [
                10,
                10,
                stale_mean(PROBE_10, "test_acc"),
                50,
                pct(stale_mean(PROBE_10, "test_acc") - stale_mean(COSINE["fixed 50 (every 5)"], "test_acc")),
                fewer(PROBE_10, COSINE["fixed 10 (factors every step)"]),
                fewer(PROBE_10, COSINE["fixed 50 (every 5)"]),
                50,
            ],
        ),
        Figure(
            page,
            "from 100, the reference is fixed 100, 41% fewer at +0.18 points (a thin margin: the target "
            "allows 57.6; without probes, 63.0 and 34% fewer)",
            lambda: [
                100,
                100,
                fewer(PROBE_100, COSINE["fixed 100 (every 10)"]),
                pct(stale_mean(PROBE_100, "test_acc") - stale_mean(COSINE["fixed 100 (every 10)"], "test_acc")),
                0.6 * stale_mean(COSINE["fixed 100 (every 10)"], "layer_inversions"),
                stale_mean(PLAIN_100, "layer_inversions"),
                fewer(PLAIN_100, COSINE["fixed 100 (every 10)"]),
            ],
        ),
        Figure(
            page,
            "On the same 3 seeds, probes cut the adaptive mode's inversions by 35% from 10 (151.7 -> 98.0) "
            "and by 11% from 100 (63.0 -> 56.3)",
            lambda: [
                len(common_10),
                fewer(PROBE_10, PLAIN_10, seeds=common_10),
                10,
                stale_mean(PLAIN_10, "layer_inversions", seeds=common_10),
                stale_mean(PROBE_10, "layer_inversions", seeds=common_10),
                fewer(PROBE_100, PLAIN_100, seeds=common_100),
                100,
                stale_mean(PLAIN_100, "layer_inversions", seeds=common_100),
                stale_mean(PROBE_100, "layer_inversions", seeds=common_100),
            ],
        ),
        Figure(
            page,
            "the layers end at intervals of 320-640 (one at 160 without probes)",
            lambda: [
                *span(
                    v
                    for r in stale_runs(PROBE_10, 2345, 0.01) + stale_runs(PROBE_100, 2345, 0.01)
                    for v in r["final_intervals"].values()
                ),
                min(
                    v
                    for label in (PLAIN_10, PLAIN_100)
                    for r in stale_runs(label, 2345, 0.01)
                    for v in r["final_intervals"].values()
                ),
            ],
        ),
        Figure(
            page,
            "at 0.01, 30-34% of the adaptive mode's inversions come in the first 100 steps",
            lambda: [0.01, *span(early), 100],
        ),
        Figure(
            page,
            "a constant-rate run stopped after 2 epochs is noisy (seed spread up to 1.7 points)",
            lambda: [
                2,
                max(
                    pct(max(r["test_acc"] for r in group) - min(r["test_acc"] for r in group))
                    for group in _constant_rate_groups()
                ),
            ],
        ),
        Figure(
            page,
            "it saved 22% at damping 0.01 (start and minimum 50: 56 inversions at 0.8628 against fixed "
            "50's 72 at 0.8630)",
            lambda: [
                fewer("adaptive-t0.1[50,800]/f<=10/damped/start50", "fixed-50/f5", steps=860),
                0.01,
                50,
                stale_mean("adaptive-t0.1[50,800]/f<=10/damped/start50", "layer_inversions", steps=860),
                stale_mean("adaptive-t0.1[50,800]/f<=10/damped/start50", "test_acc", steps=860),
                50,
                stale_mean("fixed-50/f5", "layer_inversions", steps=860),
                stale_mean("fixed-50/f5", "test_acc", steps=860),
            ],
        ),
        Figure(
            page,
            "makes 53% / 36% fewer inversions than the raw change at the same accuracy",
            lambda: [
                fewer(
                    CONSTANT_RATE["adaptive, change of the damped factors (default)"],
                    CONSTANT_RATE["adaptive, change of the raw factors"],
                    steps=860,
                    damping=0.1,
                ),
                fewer(
                    CONSTANT_RATE["adaptive, change of the damped factors (default)"],
                    CONSTANT_RATE["adaptive, change of the raw factors"],
                    steps=860,
                    damping=0.01,
                ),
            ],
        ),
    ]


def _step_cost_figures() -> list[Figure]:
    rows = [r for r in _json("step_cost.json")["rows"] if r["factor_dtype"] == "float32"]

    def ratio(model: str, freqs: tuple[int, int]) -> float:
        by_method = {
            r["method"]: r["kfac_over_sgd"]
            for r in rows
            if r["model"].startswith(model) and (r["factor_update_freq"], r["inv_update_freq"]) == freqs
        }
        return by_method["cholesky"] / by_method["eigen"]

    bf16 = next(
        r
        for r in _json("step_cost.json")["rows"]
        if r["factor_dtype"] == "bfloat16"
        and r["model"].startswith("CNN")
        and r["factor_update_freq"] == r["inv_update_freq"] == 1
    )
    f32 = next(
        r
        for r in rows
        if r["model"].startswith("CNN")
        and r["method"] == "eigen"
        and r["factor_update_freq"] == r["inv_update_freq"] == 1
    )
    return [
        Figure(
            "benchmarks.md",
            "Every row is within 1.11x of its floor in this run",
            lambda: [max(r["kfac_over_floor"] for r in rows)],
        ),
        Figure(
            "benchmarks.md",
            "The cholesky method costs 0.41-0.59x of eigen (in x SGD) where decompositions or the "
            "MLP's preconditioning dominate, and 0.91-1.00x on the CNN at 1/10 and 10/100",
            lambda: [
                *span([ratio("CNN", (1, 1)), ratio("MLP", (1, 1)), ratio("MLP", (1, 10)), ratio("MLP", (10, 100))]),
                *span([ratio("CNN", (1, 10)), ratio("CNN", (10, 100))]),
                1,
                10,
                10,
                100,
            ],
        ),
        Figure(
            "benchmarks.md",
            "(CNN 1/1: 27.3 vs 11.9 x SGD)",
            lambda: [1, 1, bf16["kfac_over_sgd"], f32["kfac_over_sgd"]],
        ),
    ]


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _matches(shown: str, value: float) -> bool:
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10**-decimals + 1e-9


FIGURES = _figures()


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.id)
def test_quoted_figure_is_the_stored_result(figure):
    text = _normalized(figure.text)
    assert text in _normalized(pages.expanded(figure.page)), f"not on {figure.page} any more: {figure.text!r}"
    shown = NUMBER.findall(text)
    values = figure.values()
    assert len(shown) == len(values), f"{len(shown)} numbers in the text, {len(values)} values: {shown}"
    wrong = [(s, round(v, 4)) for s, v in zip(shown, values, strict=True) if not _matches(s, v)]
    assert not wrong, f"{figure.page}: shown vs stored: {wrong}"
    assert figure.holds(), f"{figure.page}: {figure.text!r} no longer holds"


# --- tables quoted by hand ----------------------------------------------------------------------------
def _cells_match(cells: list[str], values: list[float | None]) -> list[tuple[str, float | None]]:
    wrong = []
    for cell, value in zip(cells, values, strict=True):
        shown = NUMBER.findall(cell.replace("**", ""))
        if value is None:
            if shown and cell not in ("miss", "-"):
                wrong.append((cell, value))
        elif not shown or not _matches(shown[0], value):
            wrong.append((cell, value))
    return wrong


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_condensed_batch_scaling_tables_are_the_stored_results(name):
    """The 'In short' tables of the batch-scaling page: steps, ratios and the step-cost ratio."""
    page = pages.expanded("results/batch_scaling/index.md")
    tables = page.split("| batch | SGD steps | AdamW steps | K-FAC steps | K-FAC / AdamW steps")
    text = tables[1 if name == "mlp" else 2]
    rows = pages.table_rows("| batch" + text.split("\n", 1)[0] + "\n" + text.split("\n", 1)[1], "batch")
    assert [int(r[0]) for r in rows] == batches(name)
    for cells in rows:
        batch = int(cells[0])
        values = [
            batch,
            steps(name, batch, "sgd"),
            steps(name, batch, "adamw"),
            steps(name, batch, "kfac"),
            kfac_over_adamw(name, batch, "steps"),
            kfac_over_adamw(name, batch, "seconds"),
            step_cost_over_adamw(name, batch),
        ]
        assert not _cells_match(cells, values), f"{name} batch {batch}: {_cells_match(cells, values)}"


def test_the_stale_statistics_tables_are_the_stored_means():
    page = pages.expanded("benchmarks.md")
    cosine = pages.table_rows(page, "schedule | layer inversions | test acc")
    assert [r[0] for r in cosine] == list(COSINE)
    for cells in cosine:
        label = COSINE[cells[0]]
        values = [None, stale_mean(label, "layer_inversions"), stale_mean(label, "test_acc")]
        assert not _cells_match(cells[1:], values[1:]), (cells, values)
    constant = pages.table_rows(page, "schedule | damping 0.1: layer inversions")
    assert [r[0] for r in constant] == list(CONSTANT_RATE)
    for cells in constant:
        label = CONSTANT_RATE[cells[0]]
        values = [
            stale_mean(label, key, steps=860, damping=d)
            for d in (0.1, 0.01)
            for key in ("layer_inversions", "test_acc")
        ]
        assert not _cells_match(cells[1:], values), (cells, values)
        if "(1 seed)" in cells[3]:
            assert len(stale_runs(label, 860, 0.01)) == 1


def test_the_step_cost_table_is_the_stored_result():
    rows = [r for r in _json("step_cost.json")["rows"] if r["factor_dtype"] == "float32"]
    shown = pages.table_rows(pages.expanded("benchmarks.md"), "model | factors / inverse every")
    assert len(shown) == len(rows)
    for cells, stored in zip(shown, rows, strict=True):
        assert cells[0] == stored["model"] and cells[2] == stored["method"], (cells, stored)
        assert cells[1] == f"{stored['factor_update_freq']} / {stored['inv_update_freq']}", cells
        values = [stored["kfac_over_sgd"], stored["kfac_over_floor"], stored["peer_over_sgd"], stored["kfac_over_peer"]]
        assert not _cells_match(cells[3:], values), (cells, values)


def test_the_distribution_modes_table_is_the_stored_result():
    stored = _json("distributed_modes.json")
    shown = pages.table_rows(pages.expanded("distributed.md"), "model | mode | KiB/step")
    assert len(shown) == len(stored["rows"])
    kib = 1024
    for cells, row_ in zip(shown, stored["rows"], strict=True):
        assert cells[1] == row_["mode"] and row_["model"].startswith(cells[0].split(" (")[0]), (cells, row_["model"])
        per_step = {k: v / stored["steps"] / kib for k, v in row_["bytes_by_kind_rank0"].items()}
        values = [
            row_["bytes_per_step_rank0"] / kib,
            per_step.get("factor_reduce", 0.0),
            per_step.get("decomposition_broadcast", 0.0),
            per_step.get("gradient_broadcast", 0.0),
        ]
        assert not _cells_match(cells[2:6], values), (cells, values)
        largest, replicated = (float(x) for x in NUMBER.findall(cells[6]))
        assert _matches(NUMBER.findall(cells[6])[0], max(row_["factor_bytes_per_rank"]) / kib), cells[6]
        assert _matches(NUMBER.findall(cells[6])[1], row_["replicated_factor_bytes"] / kib), cells[6]
        assert largest <= replicated


# --- shown outputs ----------------------------------------------------------------------------------
def test_the_demo_prints_the_accuracies_the_benchmarks_page_shows():
    """`make demo` in full (examples/digits_demo.py, 3 epochs, 2 CPU processes). The page shows
    what it printed on the machine the figures come from; another CPU may round its float sums
    differently and land a test image or two elsewhere (0.002 each), hence the tolerance."""
    result = subprocess.run(
        [sys.executable, "examples/digits_demo.py"],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    printed = dict(re.findall(r"(K-FAC|SGD)\s.*test accuracy: (\d\.\d+)", result.stdout))
    assert set(printed) == {"K-FAC", "SGD"}, result.stdout
    shown = {
        cells[0].split()[0]: float(cells[1])
        for cells in pages.table_rows(pages.expanded("benchmarks.md"), "optimizer | test accuracy")
    }
    for method in ("K-FAC", "SGD"):
        assert abs(float(printed[method]) - shown[method]) <= 0.01, (method, printed[method], shown[method])


def test_the_fit_start_summary_shown_is_the_one_printed():
    import torch

    from lightning_kfac import KFACPreconditioner
    from lightning_kfac.engine import hyperparameters
    from lightning_kfac.engine.report import fit_summary

    shown = pages.blocks("text", note="output: fit-start summary of TransformerNet")
    assert len(shown) == 1
    model_block = next(b for b in pages.blocks_on("monitoring.md") if "class TransformerNet" in b.body)
    namespace: dict[str, Any] = {}
    exec(compile(model_block.body, "<monitoring.md>", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["TransformerNet"]()  # the preconditioner holds it weakly: keep it alive
    printed = fit_summary(KFACPreconditioner(model), dict(hyperparameters.DEFAULTS))
    assert shown[0].body.rstrip("\n") == printed
