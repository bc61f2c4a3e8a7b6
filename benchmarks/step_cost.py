"""Per-step cost of K-FAC against plain SGD and against the floor of unavoidable work.

For each model, inverse method, factor dtype and (factor, inverse) interval setting it builds
one K-FAC run, warms it up (its running factors are then full-rank averages, like a real run's:
``eigh`` of a one-batch, rank-deficient factor is up to 20% cheaper) and then measures, in
``--rounds`` interleaved rounds so that every ratio is taken side by side on one machine state:

* the SGD step (forward + backward + optimizer) of an identical model, median of a few steps;
* the K-FAC step: the mean over one whole inversion period, and its parts;
* the floor, each piece measured in isolation on the run's own shapes and current factors:

      floor = SGD step
            + factor matmuls (rows^T rows for A and G)           / factor interval
            + decompositions (eigh, or Cholesky inverses)        / inverse interval
            + preconditioning matmuls (4 for eigen, 2 for cholesky), every step

The figures reported are medians over the rounds of the per-round ratios.

    python benchmarks/step_cost.py [--threads 2] [--rounds 3] [--quick] [--out benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.engine import config as _engine_config
from lightning_kfac.engine import curvature

_HAS_DAMPING_MODE = "damping_mode" in getattr(_engine_config.KFACConfig, "__dataclass_fields__", {})

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# peer (KAISA kfac-pytorch) step time / SGD step time, measured on this 2-core CPU (issue 9)
PEER_RATIO = {
    ("cnn", 1, 1): 12.2,
    ("cnn", 1, 10): 6.3,
    ("cnn", 10, 100): 1.8,
    ("mlp", 1, 1): 22.7,
    ("mlp", 1, 10): 8.9,
    ("mlp", 10, 100): 5.9,
}
SETTINGS = [(1, 1), (1, 10), (10, 100)]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1568, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
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


class SGDRun:
    def __init__(self, name: str) -> None:
        make, batch, _ = MODELS[name]
        torch.manual_seed(0)
        self.model = make()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = batch()
        for _ in range(3):
            self.step()

    def step(self) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def step_ms(self, repeats: int) -> float:
        return _time(self.step, repeats)


class KFACRun:
    """One model trained with K-FAC at one setting; measures its step and its floor pieces."""

    def __init__(
        self, name: str, factor_freq: int, inv_freq: int, method: str, factor_dtype: torch.dtype, warmup: int = 30
    ) -> None:
        make, batch, _ = MODELS[name]
        torch.manual_seed(0)
        self.model = make()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        # the eigen rows damp the Kronecker product exactly, as the peer does (the step costs the
        # same in either mode); engines before damping_mode had only that mode
        exact = {"damping_mode": "exact"} if method == "eigen" and _HAS_DAMPING_MODE else {}
        self.pre = KFACPreconditioner(
            self.model,
            lr=0.01,
            damping=1e-3,
            kl_clip=1e-3,
            factor_update_freq=factor_freq,
            inv_update_freq=inv_freq,
            inverse_method=method,
            factor_dtype=factor_dtype,
            **exact,
        )
        self.method = method
        self.x, self.y = batch()
        self.period = max(inv_freq, factor_freq)
        self.parts: dict[str, list[float]] = {"factors": [], "inverse": [], "precondition": []}
        for _ in range(max(warmup, self.period)):  # warm-up: full-rank running factors, a whole period
            self.step()

    def step(self) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.pre.step()
        self.optimizer.step()
        for key in self.parts:
            self.parts[key].append(self.pre.timings_ms[key])

    def period_ms(self) -> float:
        """Mean step time over one whole period (every step's share of the inversion)."""
        while self.pre.steps % self.period:
            self.step()
        for values in self.parts.values():
            values.clear()
        start = time.perf_counter()
        for _ in range(self.period):
            self.step()
        return (time.perf_counter() - start) * 1e3 / self.period

    def parts_ms(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.parts.items()}

    def floor_pieces_ms(self, repeats: int) -> dict[str, float]:
        """Factor matmuls, decompositions and preconditioning matmuls on this run's shapes,
        inputs and current running factors, each timed alone."""
        captured: dict[tuple[str, str], Tensor] = {}
        handles = []
        for lname, layer in self.pre.layers.items():

            def fwd(mod, inputs, output, lname=lname):
                captured[(lname, "x")] = inputs[0].detach()
                output.register_hook(lambda g: captured.__setitem__((lname, "gy"), g.detach()))

            handles.append(layer.module.register_forward_hook(fwd))
        self.pre.recording = False
        try:
            F.cross_entropy(self.model(self.x), self.y).backward()
        finally:
            self.pre.recording = True
            for h in handles:
                h.remove()
            self.optimizer.zero_grad()
        dtype = self.pre.config.factor_dtype
        factor_ms = decomposition_ms = precondition_ms = 0.0
        for lname, layer in self.pre.layers.items():
            xin, gy = captured[(lname, "x")], captured[(lname, "gy")]

            def factor_work(layer=layer, xin=xin, gy=gy):
                layer.a_statistics(xin, dtype)  # the unfold/rows and rows^T rows, nothing else
                g = layer.output_grad_rows(gy).to(dtype)
                g.T @ g

            factor_ms += _time(factor_work, repeats)
            a, g = self.pre.factors()[lname]
            a, g = a.float(), g.float()
            if self.method == "eigen":
                decomposition_ms += _time(
                    lambda a=a, g=g: (torch.linalg.eigh(a), torch.linalg.eigh(g)), max(3, repeats // 3)
                )
            else:
                decomposition_ms += _time(
                    lambda a=a, g=g: curvature.damped_cholesky_inverses(a, g, 1e-3, torch.float32),
                    max(3, repeats // 3),
                )
            v = torch.randn(layer.g_dim, layer.a_dim)
            qa, qg = torch.randn(layer.a_dim, layer.a_dim), torch.randn(layer.g_dim, layer.g_dim)
            den = torch.rand(layer.g_dim, layer.a_dim)
            if self.method == "eigen":
                precondition_ms += _time(
                    lambda qa=qa, qg=qg, v=v, den=den: qg @ ((qg.T @ v @ qa) * den) @ qa.T, repeats
                )
            else:
                precondition_ms += _time(lambda qa=qa, qg=qg, v=v: qg @ v @ qa, repeats)
        return {"factors_ms": factor_ms, "decompositions_ms": decomposition_ms, "precondition_ms": precondition_ms}


def measure_row(
    name: str,
    factor_freq: int,
    inv_freq: int,
    method: str,
    factor_dtype: torch.dtype,
    rounds: int,
    repeats: int,
    warmup: int = 30,
) -> dict:
    sgd = SGDRun(name)
    kfac = KFACRun(name, factor_freq, inv_freq, method, factor_dtype, warmup)
    per_round = []
    for _ in range(rounds):
        sgd_ms = sgd.step_ms(repeats)
        kfac_ms = kfac.period_ms()
        parts = kfac.parts_ms()
        pieces = kfac.floor_pieces_ms(repeats)
        floor = (
            sgd_ms
            + pieces["factors_ms"] / factor_freq
            + pieces["decompositions_ms"] / inv_freq
            + pieces["precondition_ms"]
        )
        per_round.append(
            {
                "sgd_ms": sgd_ms,
                "kfac_ms": kfac_ms,
                "floor_ms": floor,
                "floor_pieces_ms": pieces,
                "kfac_parts_ms": parts,
                "kfac_over_sgd": kfac_ms / sgd_ms,
                "kfac_over_floor": kfac_ms / floor,
            }
        )
    median = lambda key: statistics.median(r[key] for r in per_round)
    peer = PEER_RATIO.get((name, factor_freq, inv_freq)) if factor_dtype == torch.float32 else None
    kfac_over_sgd = median("kfac_over_sgd")
    return {
        "model": MODELS[name][2],
        "factor_update_freq": factor_freq,
        "inv_update_freq": inv_freq,
        "method": method,
        "factor_dtype": str(factor_dtype).replace("torch.", ""),
        "sgd_ms": median("sgd_ms"),
        "kfac_ms": median("kfac_ms"),
        "floor_ms": median("floor_ms"),
        "kfac_over_sgd": kfac_over_sgd,
        "kfac_over_floor": median("kfac_over_floor"),
        "floor_pieces_ms": {
            k: statistics.median(r["floor_pieces_ms"][k] for r in per_round) for k in per_round[0]["floor_pieces_ms"]
        },
        "kfac_parts_ms": {
            k: statistics.median(r["kfac_parts_ms"][k] for r in per_round) for k in per_round[0]["kfac_parts_ms"]
        },
        "rounds": per_round,
        "peer_over_sgd": peer,
        "kfac_over_peer": kfac_over_sgd / peer if peer else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per row")
    parser.add_argument("--quick", action="store_true", help="one round, the 1/1 setting only (a smoke run)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["eigen", "cholesky"])
    parser.add_argument(
        "--factor-dtypes",
        nargs="*",
        default=["float32", "bfloat16"],
        help="bfloat16 rows are measured for the eigen method",
    )
    parser.add_argument("--warmup", type=int, default=30, help="K-FAC steps before measuring (at least one period)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "step_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    rounds = 1 if args.quick else args.rounds
    settings = SETTINGS[:1] if args.quick else SETTINGS
    combos = [(m, torch.float32) for m in args.methods]
    if "eigen" in args.methods:
        combos += [("eigen", getattr(torch, d)) for d in args.factor_dtypes if d != "float32"]
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {rounds} interleaved rounds")
    print(
        f"{'model':28s} {'f/i':>6s} {'method':8s} {'factors':8s} {'SGD ms':>7s} {'K-FAC ms':>9s} {'x SGD':>6s} "
        f"{'floor ms':>9s} {'x floor':>7s} {'peer x SGD':>10s} {'x peer':>6s} "
        f"{'factors':>8s} {'inverse':>8s} {'precond':>8s}"
    )
    for name in args.models:
        for method, factor_dtype in combos:
            for factor_freq, inv_freq in settings:
                row = measure_row(name, factor_freq, inv_freq, method, factor_dtype, rounds, repeats, args.warmup)
                rows.append(row)
                p = row["kfac_parts_ms"]
                print(
                    f"{MODELS[name][2]:28s} {factor_freq:>2d}/{inv_freq:<3d} {method:8s} {row['factor_dtype']:8s} "
                    f"{row['sgd_ms']:7.1f} {row['kfac_ms']:9.1f} {row['kfac_over_sgd']:6.2f} {row['floor_ms']:9.1f} "
                    f"{row['kfac_over_floor']:7.2f} {row['peer_over_sgd'] or float('nan'):10.1f} "
                    f"{row['kfac_over_peer'] or float('nan'):6.2f} "
                    f"{p['factors']:8.1f} {p['inverse']:8.1f} {p['precondition']:8.1f}",
                    flush=True,
                )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": args.threads, "rounds": rounds, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
