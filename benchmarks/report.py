"""Aggregate the stored runs into <out>/<task>.json summaries, matplotlib figures and RESULTS.md."""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from typing import Any

import harness as H

COLORS = {"kfac": "tab:red", "sgd": "tab:blue", "adamw": "tab:green"}
SHORT = {"kfac": "K-FAC", "sgd": "SGD-momentum", "adamw": "AdamW"}
METRIC_LABEL = {
    "test_acc": "test accuracy",
    "val_acc": "validation accuracy",
    "val_loss": "validation loss (nats/char)",
}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def load_runs(out: str, task: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "runs", task, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        record["file"] = os.path.relpath(path, out)
        runs.append(record)
    return runs


def task_target(out: str, task: H.Task) -> tuple[float | None, dict[str, Any] | None]:
    if task.target is not None:
        return task.target, None
    path = os.path.join(out, f"{task.name}_target.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        info = json.load(f)
    return float(info["target"]), info


def summarize(out: str, task: H.Task) -> dict[str, Any] | None:
    runs = load_runs(out, task.name)
    if not runs:
        return None
    target, target_info = task_target(out, task)
    # a second, lower accuracy target (target - 0.01): where a budget ends before the target
    secondary = round(target - 0.01, 4) if target is not None and task.mode == "max" else None
    tuning = []
    for r in runs:
        if r.get("stage") != "tune":
            continue
        hit = H.to_target(r["evals"], r["metric"], target, task.mode)
        tuning.append(
            {
                "method": r["method"],
                "lr": r["lr"],
                "damping": r["damping"],
                "steps_to_target": hit["steps"],
                "final": r["final_metric"],
                "train_seconds": r["train_seconds"],
                "step_ms_robust": r["step_ms_robust"],
            }
        )
    methods: dict[str, Any] = {}
    for method in H.METHODS:
        seed_runs = [r for r in runs if r.get("stage") == "seed" and r["method"] == method and r["devices"] == 1]
        if not seed_runs:
            continue
        per_seed = []
        for r in sorted(seed_runs, key=lambda r: r["seed"]):
            hit2 = H.to_target(r["evals"], r["metric"], secondary, task.mode)
            hit = H.to_target(r["evals"], r["metric"], target, task.mode)
            robust_s = (
                hit["steps"] * r["step_ms_robust"] / 1e3 if hit["steps"] is not None and r["step_ms_robust"] else None
            )
            robust2 = (
                hit2["steps"] * r["step_ms_robust"] / 1e3 if hit2["steps"] is not None and r["step_ms_robust"] else None
            )
            per_seed.append(
                {
                    "seed": r["seed"],
                    "steps2": hit2["steps"],
                    "seconds_robust2": robust2,
                    "steps": hit["steps"],
                    "epochs": hit["epochs"],
                    "seconds": hit["seconds"],
                    "seconds_robust": robust_s,
                    "final": r["final_metric"],
                    "step_ms_median": r["step_ms_median"],
                    "step_ms_robust": r["step_ms_robust"],
                    "train_seconds": r["train_seconds"],
                    "kfac_ms_mean": r.get("kfac_ms_mean"),
                    "kfac_ms_median": r.get("kfac_ms_median"),
                }
            )
        n_hit = sum(p["steps"] is not None for p in per_seed)
        # a seed that never reaches the target counts as "more than the budget": the median is
        # reported only when most seeds reach it
        n_hit2 = sum(p["steps2"] is not None for p in per_seed)

        def med(key: str, per_seed=per_seed, n_hit=n_hit, n_hit2=n_hit2) -> float | None:
            if (n_hit2 if key.endswith("2") else n_hit) * 2 <= len(per_seed):
                return None
            values = [p[key] if p[key] is not None else math.inf for p in per_seed]
            m = statistics.median(values)
            return None if math.isinf(m) else m

        first = seed_runs[0]
        breakdown = None
        if method == "kfac":
            breakdown = {
                part: _median([p["kfac_ms_mean"][part] for p in per_seed if p["kfac_ms_mean"]])
                for part in ("factors", "inverse", "precondition")
            }
        methods[method] = {
            "lr": first["lr"],
            "damping": first["damping"],
            "kfac": first.get("kfac"),
            "seeds": len(per_seed),
            "reached": n_hit,
            "steps": med("steps"),
            "steps2": med("steps2"),
            "seconds_robust2": med("seconds_robust2"),
            "reached2": n_hit2,
            "epochs": med("epochs"),
            "seconds": med("seconds"),
            "seconds_robust": med("seconds_robust"),
            "final": _median([p["final"] for p in per_seed]),
            "step_ms_median": _median([p["step_ms_median"] for p in per_seed]),
            "step_ms_robust": _median([p["step_ms_robust"] for p in per_seed]),
            "kfac_ms_mean": breakdown,
            "max_steps": first["max_steps"],
            "steps_per_epoch": first["steps_per_epoch"],
            "per_seed": per_seed,
            "threads": first["env"]["torch_threads"],
        }
    ratios = None
    if "kfac" in methods:
        firsts = [m for m in ("sgd", "adamw") if m in methods and methods[m]["steps"] is not None]
        if firsts:
            best = min(firsts, key=lambda m: (methods[m]["steps"], methods[m]["seconds_robust"] or math.inf))
            k = methods["kfac"]

            def ratio(key: str) -> float | None:
                if k[key] is None or not methods[best][key]:
                    return None
                return k[key] / methods[best][key]

            ratios = {
                "best_first_order": best,
                "steps": ratio("steps"),
                "seconds": ratio("seconds"),
                "seconds_robust": ratio("seconds_robust"),
                "step_cost": ratio("step_ms_robust"),
            }
        firsts2 = [m for m in ("sgd", "adamw") if m in methods and methods[m]["steps2"] is not None]
        if firsts2:
            best2 = min(firsts2, key=lambda m: (methods[m]["steps2"], methods[m]["seconds_robust2"] or math.inf))
            k = methods["kfac"]
            ratios = ratios or {}
            ratios["secondary"] = {
                "best_first_order": best2,
                "steps": k["steps2"] / methods[best2]["steps2"] if k["steps2"] is not None else None,
                "seconds_robust": k["seconds_robust2"] / methods[best2]["seconds_robust2"]
                if k["seconds_robust2"] is not None and methods[best2]["seconds_robust2"]
                else None,
            }
    dist = None
    dist_runs = [r for r in runs if r.get("stage") == "dist"]
    if dist_runs:
        dist = []
        for r in sorted(dist_runs, key=lambda r: r["seed"]):
            one = next(
                (
                    s
                    for s in runs
                    if s.get("stage") == "seed"
                    and s["method"] == "kfac"
                    and s["seed"] == r["seed"]
                    and s["lr"] == r["lr"]
                    and s["damping"] == r["damping"]
                    and s["devices"] == 1
                ),
                None,
            )
            lower = target - 0.02 if target is not None and task.mode == "max" else None
            row = {
                "seed": r["seed"],
                "devices": r["devices"],
                "batch_per_process": r["batch_size_per_process"],
                "lower_target": lower,
                "steps_lower_2proc": H.to_target(r["evals"], r["metric"], lower, task.mode)["steps"],
                "global_batch": r["global_batch_size"],
                "steps_2proc": H.to_target(r["evals"], r["metric"], target, task.mode)["steps"],
                "final_2proc": r["final_metric"],
            }
            if one is not None:
                row.update(
                    steps_1proc=H.to_target(one["evals"], one["metric"], target, task.mode)["steps"],
                    final_1proc=one["final_metric"],
                    batch_1proc=one["global_batch_size"],
                    steps_lower_1proc=H.to_target(one["evals"], one["metric"], lower, task.mode)["steps"],
                )
                a = {e["step"]: e[r["metric"]] for e in one["evals"] if r["metric"] in e}
                b = {e["step"]: e[r["metric"]] for e in r["evals"] if r["metric"] in e}
                common = sorted(set(a) & set(b))
                row["mean_abs_diff"] = statistics.fmean(abs(a[k] - b[k]) for k in common) if common else None
            dist.append(row)
    ablation = None
    abl_runs = [r for r in runs if r.get("stage") == "ablation"]
    if abl_runs:
        base = [
            r
            for r in runs
            if r.get("stage") == "seed" and r["method"] == "kfac" and r["seed"] == 0 and r["devices"] == 1
        ]
        ablation = []
        for r in base + sorted(
            abl_runs, key=lambda r: (r["kfac"]["kl_clip"] or 0, r["kfac"]["inv_update_freq"], -r["damping"])
        ):
            ablation.append(
                {
                    "kfac": r["kfac"],
                    "lr": r["lr"],
                    "seed": r["seed"],
                    "stage": r["stage"],
                    "kl_scale_median": r.get("kl_scale_median"),
                    "steps": H.to_target(r["evals"], r["metric"], target, task.mode)["steps"],
                    "final": r["final_metric"],
                    "step_ms_robust": r["step_ms_robust"],
                    "kfac_ms_mean": r["kfac_ms_mean"],
                }
            )
    summary = {
        "task": task.name,
        "title": task.title,
        "metric": task.metric,
        "mode": task.mode,
        "target": target,
        "secondary_target": secondary,
        "target_info": target_info,
        "max_steps": task.max_steps,
        "tune_steps": task.tune_steps,
        "eval_every": task.eval_every,
        "batch_size": task.batch_size,
        "lr_grid": {k: list(v) for k, v in task.lrs.items()},
        "damping_grid": list(task.dampings),
        "kfac_fixed": task.kfac,
        "tuning": tuning,
        "methods": methods,
        "ratios": ratios,
        "dist": dist,
        "ablation": ablation,
    }
    with open(os.path.join(out, f"{task.name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --- figures -----------------------------------------------------------------------------------
def _median_curve(runs: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float], list[float]]:
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for e in r["evals"]:
            if metric in e:
                by_step.setdefault(e["step"], []).append((e[metric], e["seconds"]))
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    return (
        steps,
        [statistics.median(v for v, _ in by_step[s]) for s in steps],
        [statistics.median(t for _, t in by_step[s]) for s in steps],
    )


def plot_task(out: str, task: H.Task, summary: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in load_runs(out, task.name) if r.get("stage") == "seed" and r["devices"] == 1]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in H.METHODS:
        mruns = [r for r in runs if r["method"] == method]
        if not mruns:
            continue
        metric = mruns[0]["metric"]
        for r in mruns:
            xs = [e["step"] for e in r["evals"] if metric in e]
            ts = [e["seconds"] for e in r["evals"] if metric in e]
            ys = [e[metric] for e in r["evals"] if metric in e]
            axes[0].plot(xs, ys, color=COLORS[method], alpha=0.25, lw=0.8)
            axes[1].plot(ts, ys, color=COLORS[method], alpha=0.25, lw=0.8)
        steps, values, seconds = _median_curve(mruns, metric)
        m = summary["methods"].get(method, {})
        label = (
            f"{SHORT[method]} (lr {m.get('lr', 0):g}"
            + (f", damping {m['damping']:g}" if m.get("damping") else "")
            + ")"
        )
        axes[0].plot(steps, values, color=COLORS[method], lw=2, label=label)
        axes[1].plot(seconds, values, color=COLORS[method], lw=2, label=label)
    target = summary["target"]
    ylabel = METRIC_LABEL.get(task.metric, task.metric)
    for ax, xlabel in zip(axes, ("optimizer steps", "training wall-clock (s, evaluation excluded)"), strict=True):
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if task.mode == "max" and target is not None:
            ax.set_ylim(max(0.0, target - 0.12), min(1.0, target + 0.05))
        elif target is not None:
            ax.set_ylim(target - 0.3, target + 0.9)
    axes[0].legend(fontsize=8, loc="lower right" if task.mode == "max" else "upper right")
    threads = runs[0]["env"]["torch_threads"]
    n_seeds = len(runs) // max(1, len({r["method"] for r in runs}))
    fig.suptitle(f"{task.title}: median over {n_seeds} seeds (thin: each seed), {threads} torch thread(s)")
    fig.tight_layout()
    path = os.path.join(out, f"{task.name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dist(out: str, task: H.Task) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(out, task.name)
    dist = [r for r in runs if r.get("stage") == "dist"]
    if not dist:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(sorted(dist, key=lambda r: r["seed"])):
        one = next(
            (
                s
                for s in runs
                if s.get("stage") == "seed" and s["method"] == "kfac" and s["seed"] == r["seed"] and s["devices"] == 1
            ),
            None,
        )
        color = f"C{i}"
        for rec, ls, label in ((one, "-", "1 process, batch 128"), (r, "--", "2 processes, batch 64 each")):
            if rec is None:
                continue
            ys = [(e["step"], e[rec["metric"]]) for e in rec["evals"] if rec["metric"] in e]
            ax.plot([a for a, _ in ys], [b for _, b in ys], ls=ls, color=color, label=f"seed {r['seed']}: {label}")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(METRIC_LABEL.get(task.metric, task.metric))
    if task.target is not None and task.mode == "max":
        ax.axhline(task.target, color="k", ls=":", lw=0.8)
        ax.set_ylim(task.target - 0.1, task.target + 0.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{task.title}: K-FAC, 1 vs 2 CPU processes", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, f"{task.name}_dist.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(out: str, summaries: dict[str, dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(name, s) for name, s in summaries.items() if s and s["methods"]]
    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(max(8.0, 4.2 * len(items)), 4.2), squeeze=False)
    parts = (
        ("factors", "K-FAC factors", "tab:orange"),
        ("inverse", "K-FAC inversions (amortised)", "tab:purple"),
        ("precondition", "K-FAC preconditioning", "tab:brown"),
    )
    for ax, (_, s) in zip(axes[0], items, strict=True):
        labels = []
        for i, method in enumerate(m for m in H.METHODS if m in s["methods"]):
            m = s["methods"][method]
            total = m["step_ms_robust"] or 0.0
            labels.append(SHORT[method])
            if method == "kfac" and m["kfac_ms_mean"]:
                k = m["kfac_ms_mean"]
                kfac_total = sum(v or 0.0 for v in k.values())
                rest = max(0.0, total - kfac_total)
                sgd = s["methods"].get("sgd", {}).get("step_ms_robust")
                base = min(rest, sgd) if sgd else rest
                ax.bar(i, base, color="tab:gray", label="data, forward, backward, optimizer")
                ax.bar(
                    i, rest - base, bottom=base, color="tab:olive", label="K-FAC factor hooks (rest over SGD's step)"
                )
                bottom = rest
                for key, label, color in parts:
                    ax.bar(i, k[key] or 0.0, bottom=bottom, color=color, label=label)
                    bottom += k[key] or 0.0
            else:
                ax.bar(i, total, color="tab:gray")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("ms per step (amortised)")
        ax.set_title(s["title"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = os.path.join(out, "time_breakdown.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- markdown ----------------------------------------------------------------------------------
def _f(value: Any, fmt: str = "{:.0f}", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def _setting(m: dict[str, Any]) -> str:
    s = f"lr {m['lr']:g}"
    if m.get("damping"):
        s += f", damping {m['damping']:g}"
    return s


def markdown(out: str, tasks: dict[str, H.Task], summaries: dict[str, dict[str, Any]], smoke: bool) -> str:
    lines = ["# Benchmark results", ""]
    if smoke:
        lines += ["**Smoke run** (tiny budgets, possibly generated data): these numbers mean nothing.", ""]
    any_summary = next((s for s in summaries.values() if s and s["methods"]), None)
    threads = next(iter(any_summary["methods"].values()))["threads"] if any_summary else "?"
    lines += [
        "Produced by `python benchmarks/run.py --all` (see `benchmarks/README.md` for the method). One process,",
        f"`torch.set_num_threads({threads})`, CPU. *Steps / epochs / s to target*: median over seeds of the first",
        "evaluation (every `eval_every` steps) at which the metric reaches the target; *s (measured)* sums the",
        "training wall-clock up to there (evaluation excluded); *s (steps x cost)* multiplies the steps by the",
        "run's amortised step cost (median over 50-step blocks, inversions included), which load from other",
        "processes on the shared machine disturbs less. The methods alternate within each seed, so their times",
        "are measured side by side. A median is shown only when most seeds reach the target.",
        "",
    ]
    for name, task in tasks.items():
        s = summaries.get(name)
        if not s or not s["methods"]:
            continue
        cmp = "≥" if task.mode == "max" else "≤"
        info = s.get("target_info")
        epochs = s["max_steps"] / max(1, next(iter(s["methods"].values()))["steps_per_epoch"])
        lines += [
            f"## {s['title']}",
            "",
            f"Target: {METRIC_LABEL.get(s['metric'], s['metric'])} {cmp} **{s['target']}**"
            + (f" ({info['rule']}: {info['value_there']} at step {info['at_step']})" if info else "")
            + f". Budget {s['max_steps']} steps of batch {s['batch_size']}"
            + f" ({epochs:.1f} epochs), evaluated every {s['eval_every']} steps.",
            "",
        ]
        sec = s.get("secondary_target")
        sec_head = f" steps to {sec:g} |" if sec is not None else ""
        lines += [
            "| optimizer | setting | reached | steps to target | epochs "
            + "| s to target (measured) | s to target (steps x cost) |"
            + sec_head
            + " final at budget | step ms (median) | step ms (amortised) |",
            "|---|---|---|---|---|---|---|" + ("---|" if sec is not None else "") + "---|---|---|",
        ]
        for method in H.METHODS:
            m = s["methods"].get(method)
            if not m:
                continue
            lines.append(
                f"| {SHORT[method]} | {_setting(m)} | {m['reached']}/{m['seeds']} | {_f(m['steps'])} | "
                f"{_f(m['epochs'], '{:.2f}')} | {_f(m['seconds'], '{:.1f}')} | {_f(m['seconds_robust'], '{:.1f}')} | "
                + (f"{_f(m.get('steps2'))} ({m.get('reached2')}/{m['seeds']}) | " if sec is not None else "")
                + f"{_f(m['final'], '{:.4f}')} | "
                f"{_f(m['step_ms_median'], '{:.1f}')} | {_f(m['step_ms_robust'], '{:.1f}')} |"
            )
        lines.append("")
        r = s.get("ratios")
        if not r or r.get("steps") is None:
            lines += [
                "No ratio at the target: K-FAC or every first-order method missed it in most seeds within the budget "
                "(see *reached*).",
                "",
            ]
        if r and r.get("secondary"):
            r2 = r["secondary"]
            lines += [
                f"At the lower target {sec:g}: K-FAC / best first-order ({SHORT[r2['best_first_order']]}): steps "
                f"**{_f(r2['steps'], '{:.2f}')}x**, "
                f"wall-clock (steps x cost) **{_f(r2['seconds_robust'], '{:.2f}')}x**.",
                "",
            ]
        if r and r.get("steps") is not None:
            steps_ok = r["steps"] is not None and r["steps"] <= 0.5
            time_ok = r["seconds_robust"] is not None and r["seconds_robust"] <= 0.8
            lines += [
                f"K-FAC / best first-order ({SHORT[r['best_first_order']]}): steps **{_f(r['steps'], '{:.2f}')}x** "
                f"(goal ≤ 0.5x: {'met' if steps_ok else 'not met'}), "
                f"wall-clock **{_f(r['seconds_robust'], '{:.2f}')}x** steps x cost, "
                f"{_f(r['seconds'], '{:.2f}')}x measured (goal ≤ 0.8x: {'met' if time_ok else 'not met'}); "
                f"cost per step {_f(r['step_cost'], '{:.2f}')}x.",
                "",
            ]
        k = s["methods"].get("kfac")
        if k and k.get("kfac_ms_mean"):
            b = k["kfac_ms_mean"]
            rest = (k["step_ms_robust"] or 0) - sum(v or 0 for v in b.values())
            sgd = s["methods"].get("sgd")
            hooks = (
                f" = SGD's whole step {sgd['step_ms_robust']:.1f} ms + {rest - sgd['step_ms_robust']:.1f} ms for the "
                "factor hooks in forward and backward (input rows / patches and their products, every factor step) "
                "and the DDP wrapper's share"
                if sgd and sgd.get("step_ms_robust")
                else ""
            )
            lines += [
                f"K-FAC step ({_f(k['step_ms_robust'], '{:.1f}')} ms amortised; settings {json.dumps(k['kfac'])}): "
                f"engine factor update {_f(b['factors'], '{:.1f}')} ms, "
                f"inversions {_f(b['inverse'], '{:.1f}')} ms (amortised), "
                f"preconditioning {_f(b['precondition'], '{:.1f}')} ms (the `kfac/time_*_ms` figures), "
                f"rest {rest:.1f} ms{hooks}.",
                "",
            ]
        lines += [f"![{name}]({name}.png)", ""]
        if s["dist"]:
            low = s["dist"][0].get("lower_target")
            lines += [
                "Distributed check (K-FAC, same settings and seed, same global batch; the two runs draw the samples in",
                "different orders, so they agree statistically, not bit for bit):",
                "",
                f"| seed | 1 process: batch | steps to {s['target']:g} | steps to {_f(low, '{:g}')} | final "
                f"| 2 processes: batch | steps to {s['target']:g} | steps to {_f(low, '{:g}')} | final "
                "| mean abs. difference of the curves |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for d in s["dist"]:
                lines.append(
                    f"| {d['seed']} | {d.get('batch_1proc', '—')} | {_f(d.get('steps_1proc'))} "
                    f"| {_f(d.get('steps_lower_1proc'))} | {_f(d.get('final_1proc'), '{:.4f}')} "
                    f"| {d['batch_per_process']} x 2 | {_f(d['steps_2proc'])} | {_f(d.get('steps_lower_2proc'))} "
                    f"| {_f(d['final_2proc'], '{:.4f}')} | {_f(d.get('mean_abs_diff'), '{:.4f}')} |"
                )
            lines += ["", f"![distributed check]({name}_dist.png)", ""]
        if s.get("ablation"):
            lines += [
                "What limits K-FAC here (seed 0, same learning rate and budget; first row: the benchmark's setting):",
                "",
                "| factors every | inversions every | damping | KL clip | median KL scale | steps to target | final "
                "| step ms (amortised) | factors / inversions / preconditioning ms |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for a in s["ablation"]:
                b = a["kfac_ms_mean"] or {}
                kf = a["kfac"]
                lines.append(
                    f"| {kf['factor_update_freq']} | {kf['inv_update_freq']} | {kf['damping']:g} "
                    f"| {_f(kf['kl_clip'], '{:g}')} | {_f(a.get('kl_scale_median'), '{:.3f}')} | {_f(a['steps'])} "
                    f"| {_f(a['final'], '{:.4f}')} | {_f(a['step_ms_robust'], '{:.1f}')} "
                    f"| {_f(b.get('factors'), '{:.1f}')} / {_f(b.get('inverse'), '{:.1f}')} "
                    f"/ {_f(b.get('precondition'), '{:.1f}')} |"
                )
            lines.append("")
    n_lrs = max((len(v) for t in tasks.values() for v in t.lrs.values()), default=0)
    n_damp = max((len(t.dampings) for t in tasks.values()), default=0)
    lines += [
        "![time breakdown](time_breakdown.png)",
        "",
        "## Tuning",
        "",
        "Seed 0, validation split (5000 images held out of the 60k training set for Fashion-MNIST; the last 10% of",
        f"the text for the LM), the tuning budget below. Each optimizer: {n_lrs} learning rates. "
        "K-FAC (SGD-momentum 0.9",
        f"underneath): its {n_lrs} learning rates at the middle of {n_damp} dampings, "
        "then the other dampings at the best of them.",
        "Chosen: the fewest steps to the target on the validation split, then the best final value. A choice at",
        "the edge of its grid is marked with *edge*: the best value may lie outside the grid.",
        "",
    ]
    for name, task in tasks.items():
        s = summaries.get(name)
        if not s or not s["tuning"]:
            continue
        lines += [
            f"**{s['title']}** ({s['tune_steps']} steps per run; K-FAC fixed: {json.dumps(s['kfac_fixed'])})",
            "",
            "| optimizer | lr | damping | val steps to target | final val | amortised step ms |",
            "|---|---|---|---|---|---|",
        ]
        chosen = {m: (v["lr"], v["damping"]) for m, v in s["methods"].items()}
        for t in sorted(s["tuning"], key=lambda t: (H.METHODS.index(t["method"]), t["damping"] or 0, t["lr"])):
            mark = ""
            if chosen.get(t["method"]) == (t["lr"], t["damping"]):
                grid = task.lrs[t["method"]]
                edge = t["lr"] in (grid[0], grid[-1]) and len(grid) > 1
                if t["damping"] is not None and t["damping"] in (task.dampings[0], task.dampings[-1]):
                    edge = True
                mark = " **(chosen" + (", edge" if edge else "") + ")**"
            lines.append(
                f"| {SHORT[t['method']]}{mark} | {t['lr']:g} | {_f(t['damping'], '{:g}')} "
                f"| {_f(t['steps_to_target'])} | {_f(t['final'], '{:.4f}')} | {_f(t['step_ms_robust'], '{:.1f}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(out: str, tasks: dict[str, H.Task], dist_task: str | None = None, smoke: bool = False) -> list[str]:
    summaries = {name: summarize(out, task) for name, task in tasks.items()}
    written = [os.path.join(out, f"{n}.json") for n, s in summaries.items() if s]
    for name, task in tasks.items():
        if summaries[name]:
            for path in (plot_task(out, task, summaries[name]), plot_dist(out, task)):
                if path:
                    written.append(path)
    path = plot_breakdown(out, {n: s for n, s in summaries.items() if s})
    if path:
        written.append(path)
    md = os.path.join(out, "RESULTS.md")
    with open(md, "w") as f:
        f.write(markdown(out, tasks, summaries, smoke))
    written.append(md)
    return written
