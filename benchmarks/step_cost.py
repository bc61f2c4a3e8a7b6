"""Per-step cost of K-FAC against plain SGD and against the floor of unavoidable work.

For each model and (factor, inverse) interval setting it times, side by side in one process:
the SGD step; the K-FAC step (mean over whole inversion periods, the median of 3 periods) with
its parts; and the floor, each piece measured in isolation on the same shapes:

    floor = SGD step (forward + backward + optimizer)
          + factor matmuls (rows^T rows for A and G)           / factor interval
          + decompositions (eigh, or Cholesky inverses)        / inverse interval
          + preconditioning matmuls (4 for eigen, 2 for cholesky), every step

    python benchmarks/step_cost.py [--threads 2] [--quick] [--out benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_kfac import KFACPreconditioner  # noqa: E402
from lightning_kfac.engine import curvature  # noqa: E402

# peer (KAISA kfac-pytorch) step time / SGD step time, measured on this 2-core CPU (issue 9)
PEER_RATIO = {
    ("cnn", 1, 1): 12.2, ("cnn", 1, 10): 6.3, ("cnn", 10, 100): 1.8,
    ("mlp", 1, 1): 22.7, ("mlp", 1, 10): 8.9, ("mlp", 10, 100): 5.9,
}
SETTINGS = [(1, 1), (1, 10), (10, 100)]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1568, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


MODELS = {
    "cnn": (cnn, lambda: (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))), "CNN 1x28x28, B=128"),
    "mlp": (mlp, lambda: (torch.randn(256, 784), torch.randint(0, 10, (256,))), "MLP 784-1024-1024-10, B=256"),
}


def _time(fn, repeats: int) -> float:
    """Median wall time of fn() in ms."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def sgd_step_ms(name: str, repeats: int) -> float:
    make, batch, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch()

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    return _time(step, repeats)


def kfac_step_ms(name: str, factor_freq: int, inv_freq: int, method: str, periods: int = 3, **options) -> dict:
    make, batch, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pre = KFACPreconditioner(
        model, lr=0.01, damping=1e-3, factor_update_freq=factor_freq, inv_update_freq=inv_freq, inverse_method=method, **options
    )
    x, y = batch()
    period = max(inv_freq, factor_freq)
    parts = {"factors": [], "inverse": [], "precondition": []}

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        optimizer.step()
        for key in parts:
            parts[key].append(pre.timings_ms[key])

    for _ in range(period):  # warm-up: one whole period
        step()
    means = []
    for _ in range(periods):
        for key in parts:
            parts[key].clear()
        start = time.perf_counter()
        for _ in range(period):
            step()
        means.append((time.perf_counter() - start) * 1e3 / period)
    median = statistics.median(means)
    return {"step_ms": median, "parts_ms": {k: sum(v) / len(v) for k, v in parts.items()}, "period_means_ms": means}


def floor_pieces_ms(name: str, method: str, repeats: int) -> dict:
    """Factor matmuls, decompositions and preconditioning matmuls on the model's real shapes."""
    make, batch, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    pre = KFACPreconditioner(model, lr=0.01, inv_update_freq=1, inverse_method=method, kl_clip=None)
    x, y = batch()
    captured = {}
    handles = []
    for lname, layer in pre.layers.items():
        def fwd(mod, inputs, output, lname=lname, layer=layer):
            captured[(lname, "x")] = inputs[0].detach()
            output.register_hook(lambda g: captured.__setitem__((lname, "gy"), g.detach()))
        handles.append(layer.module.register_forward_hook(fwd))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    for h in handles:
        h.remove()
    factor_ms = decomposition_ms = precondition_ms = 0.0
    for lname, layer in pre.layers.items():
        xin, gy = captured[(lname, "x")], captured[(lname, "gy")]

        def factor_work():
            rows = layer.input_rows(xin)
            rows.T @ rows
            g = layer.output_grad_rows(gy)
            g.T @ g

        factor_ms += _time(factor_work, repeats)
        a, g = pre.factors()[lname]
        if method == "eigen":
            decomposition_ms += _time(lambda: (torch.linalg.eigh(a), torch.linalg.eigh(g)), max(3, repeats // 4))
        else:
            decomposition_ms += _time(lambda: curvature.damped_cholesky_inverses(a, g, 1e-3, torch.float32), max(3, repeats // 4))
        v = torch.randn(layer.g_dim, layer.a_dim)
        qa, qg = torch.randn(layer.a_dim, layer.a_dim), torch.randn(layer.g_dim, layer.g_dim)
        den = torch.rand(layer.g_dim, layer.a_dim)
        if method == "eigen":
            precondition_ms += _time(lambda: qg @ ((qg.T @ v @ qa) * den) @ qa.T, repeats)
        else:
            precondition_ms += _time(lambda: qg @ v @ qa, repeats)
    return {"factors_ms": factor_ms, "decompositions_ms": decomposition_ms, "precondition_ms": precondition_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and periods (a smoke run)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["eigen", "cholesky"])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "step_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    periods = 1 if args.quick else 3
    settings = SETTINGS[:1] if args.quick else SETTINGS
    rows = []
    header = f"{'model':30s} {'f/i':>6s} {'method':8s} {'SGD ms':>7s} {'K-FAC ms':>9s} {'x SGD':>6s} {'floor ms':>9s} {'x floor':>7s} {'peer x SGD':>10s} {'factors':>8s} {'inverse':>8s} {'precond':>8s}"
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(header)
    for name in args.models:
        sgd = sgd_step_ms(name, repeats)
        for method in args.methods:
            pieces = floor_pieces_ms(name, method, repeats)
            for factor_freq, inv_freq in settings:
                kfac = kfac_step_ms(name, factor_freq, inv_freq, method, periods)
                floor = sgd + pieces["factors_ms"] / factor_freq + pieces["decompositions_ms"] / inv_freq + pieces["precondition_ms"]
                peer = PEER_RATIO.get((name, factor_freq, inv_freq))
                row = {
                    "model": MODELS[name][2], "factor_update_freq": factor_freq, "inv_update_freq": inv_freq,
                    "method": method, "sgd_ms": sgd, "kfac_ms": kfac["step_ms"], "kfac_over_sgd": kfac["step_ms"] / sgd,
                    "floor_ms": floor, "kfac_over_floor": kfac["step_ms"] / floor, "floor_pieces_ms": pieces,
                    "kfac_parts_ms": kfac["parts_ms"], "period_means_ms": kfac["period_means_ms"],
                    "peer_over_sgd": peer,
                    "kfac_over_peer": (kfac["step_ms"] / sgd) / peer if peer else None,
                }
                rows.append(row)
                p = kfac["parts_ms"]
                print(f"{MODELS[name][2]:30s} {factor_freq:>2d}/{inv_freq:<3d} {method:8s} {sgd:7.1f} {kfac['step_ms']:9.1f} "
                      f"{row['kfac_over_sgd']:6.2f} {floor:9.1f} {row['kfac_over_floor']:7.2f} {peer or float('nan'):10.1f} "
                      f"{p['factors']:8.1f} {p['inverse']:8.1f} {p['precondition']:8.1f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
