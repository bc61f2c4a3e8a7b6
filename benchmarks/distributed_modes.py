"""Bytes per step and per-rank memory of each distribution mode (COMM-OPT, HYBRID, MEM-OPT) on
forked gloo ranks, for the test CNN and a wider MLP. Prints a table, writes JSON.

    python benchmarks/distributed_modes.py [--world 4] [--steps 20] [--out benchmarks/results/distributed_modes.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac import KFACPreconditioner
from lightning_kfac.testing.distributed import run_distributed
from lightning_kfac.testing.models import MLP, SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "SmallCNN (conv 1-4-4, fc 64-16-16-5)": (
        SmallCNN,
        lambda g: (torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)),
    ),
    "MLP 784-512-512-10": (
        lambda: MLP((784, 512, 512, 10)),
        lambda g: (torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)),
    ),
}


def measure(rank, world_size, model_name, fraction, steps, inv_update_freq):
    make_model, make_batch = MODELS[model_name]
    torch.manual_seed(0)
    model = make_model()
    net = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, lr=0.1, inv_update_freq=inv_update_freq, grad_worker_fraction=fraction)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    per_step = []
    for _ in range(steps):
        optimizer.zero_grad()
        x, y = make_batch(gen)
        F.cross_entropy(net(x), y).backward()
        pre.step()
        optimizer.step()
        per_step.append(pre.step_bytes)
    memory = pre.memory_usage()
    return {
        "bytes_by_kind": pre.bytes_by_kind(),
        "bytes_per_step": sum(per_step) / steps,
        "memory": memory,
        "loads_max_over_mean": pre.plan.max_over_mean_load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inv-update-freq", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distributed_modes.json"))
    args = parser.parse_args()
    world = args.world
    modes = (
        [("COMM-OPT", 1.0)] + ([("HYBRID", 0.5)] if world % 2 == 0 and world > 2 else []) + [("MEM-OPT", 1.0 / world)]
    )
    rows = []
    print(f"world size {world}, {args.steps} steps, factor update every step, inversion every {args.inv_update_freq}")
    print(
        f"{'model':38s} {'mode':9s} {'KiB/step/rank':>13s} {'factor_reduce':>13s} {'decomp_bcast':>12s} "
        f"{'grad_bcast':>10s} {'max factors KiB':>15s} {'replicated KiB':>14s} {'max decomp KiB':>14s}"
    )
    for model_name in MODELS:
        for mode, fraction in modes:
            results = run_distributed(
                measure, world, model_name, fraction, args.steps, args.inv_update_freq, timeout=600
            )
            kinds = results[0]["bytes_by_kind"]
            row = {
                "model": model_name,
                "mode": mode,
                "grad_worker_fraction": fraction,
                "world_size": world,
                "bytes_per_step_rank0": results[0]["bytes_per_step"],
                "bytes_by_kind_rank0": kinds,
                "factor_bytes_per_rank": [r["memory"]["factors"] for r in results],
                "decomposition_bytes_per_rank": [r["memory"]["decompositions"] for r in results],
                "replicated_factor_bytes": results[0]["memory"]["replicated_factors"],
                "assigned_cost_max_over_mean": results[0]["loads_max_over_mean"],
            }
            rows.append(row)
            kib_per_step = {kind: kinds.get(kind, 0) / args.steps / 1024 for kind in kinds}
            print(
                f"{model_name:38s} {mode:9s} {row['bytes_per_step_rank0'] / 1024:13.1f} "
                f"{kib_per_step.get('factor_reduce', 0):13.1f} {kib_per_step.get('decomposition_broadcast', 0):12.1f} "
                f"{kib_per_step.get('gradient_broadcast', 0):10.1f} {max(row['factor_bytes_per_rank']) / 1024:15.1f} "
                f"{row['replicated_factor_bytes'] / 1024:14.1f} {max(row['decomposition_bytes_per_rank']) / 1024:14.1f}"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "inv_update_freq": args.inv_update_freq, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
