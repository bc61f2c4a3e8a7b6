"""Per-step cost of two versions of the engine, side by side in one run.

For every row of ``benchmarks/step_cost.py`` (model, factor/inverse interval, inverse method) and
every round, one subprocess imports engine A and one imports engine B (the order alternates
between rounds) and each measures its own K-FAC step / SGD step ratio with
``step_cost.measure_row`` (one round: SGD step, warmed-up K-FAC period, floor pieces). Ratios
taken inside one process are what compare across processes on a shared machine; the table gives
the median over rounds of each engine's ratio and of B's over A's.

    git worktree add /tmp/engine_before <rev>
    python benchmarks/compare_engines.py --before /tmp/engine_before [--rounds 3] [--threads 1]

``--before``/``--after`` are repository roots (``--after`` defaults to this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = [(1, 1), (1, 10), (10, 100)]

_MEASURE = """
import json, sys, torch
sys.path[:0] = [{root!r}, {bench!r}]
import lightning_kfac, step_cost
assert lightning_kfac.__file__.startswith({root!r}), lightning_kfac.__file__
torch.set_num_threads({threads})
row = step_cost.measure_row({model!r}, {f}, {i}, {method!r}, torch.float32, 1, {repeats}, 30)
print("ROW " + json.dumps({{k: row[k] for k in ("sgd_ms", "kfac_ms", "floor_ms", "kfac_over_sgd", "kfac_over_floor")}}))
"""


def measure(root: str, model: str, f: int, i: int, method: str, threads: int, repeats: int) -> dict:
    code = _MEASURE.format(
        root=root, bench=HERE, threads=threads, model=model, f=f, i=i, method=method, repeats=repeats
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{root}: {done.stderr[-2000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("ROW "))
    return json.loads(line[4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="repository root of the engine measured first")
    parser.add_argument("--after", default=ROOT, help="repository root of the other engine (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=["cnn", "mlp"])
    parser.add_argument("--methods", nargs="*", default=["eigen", "cholesky"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "step_cost_compare.json"))
    args = parser.parse_args()
    rows = [(m, f, i, meth) for m in args.models for meth in args.methods for f, i in SETTINGS]
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for row in rows:
            order = [("before", args.before), ("after", args.after)]
            for label, root in order if r % 2 == 0 else order[::-1]:
                results.setdefault(f"{row}|{label}", []).append(measure(root, *row, args.threads, args.repeats))
            print(f"round {r + 1}/{args.rounds} {row} done", flush=True)
    table = []
    print(f"{'model':5s} {'f/i':>7s} {'method':8s} {'before x SGD':>12s} {'after x SGD':>11s} {'after/before':>12s}")
    for row in rows:
        before, after = results[f"{row}|before"], results[f"{row}|after"]
        ratios = [a["kfac_over_sgd"] / b["kfac_over_sgd"] for a, b in zip(after, before, strict=True)]
        entry = {
            "model": row[0], "factor_update_freq": row[1], "inv_update_freq": row[2], "method": row[3],
            "before_over_sgd": statistics.median(b["kfac_over_sgd"] for b in before),
            "after_over_sgd": statistics.median(a["kfac_over_sgd"] for a in after),
            "after_over_before": statistics.median(ratios), "rounds": {"before": before, "after": after},
        }  # fmt: skip
        table.append(entry)
        print(
            f"{row[0]:5s} {row[1]:>3d}/{row[2]:<3d} {row[3]:8s} {entry['before_over_sgd']:12.2f} "
            f"{entry['after_over_sgd']:11.2f} {entry['after_over_before']:12.3f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"before": args.before, "after": args.after, "threads": args.threads, "rows": table}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
