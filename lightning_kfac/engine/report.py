"""What a preconditioner is doing, for people: the fit-start summary, the memory estimate per
rank, and per-layer statistics (traces, condition numbers, adaptive intervals).

Sizes come from each layer's :class:`~lightning_kfac.engine.factors.FactorLayout`, the same
description the exchange and the checkpoints use, so the numbers here are the ones held.
No Lightning import.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_kfac.distributed.assignment import WorkPlan
    from lightning_kfac.engine.preconditioner import KFACPreconditioner
    from lightning_kfac.engine.staleness import StalenessConfig


def estimated_memory(pre: KFACPreconditioner, plan: WorkPlan) -> list[dict[str, int]]:
    """Bytes each rank will hold once training runs: running factors (owners), per-step
    accumulators (every rank, every layer) and decompositions (gradient workers)."""
    f_size = pre.config.factor_dtype.itemsize
    i_size = pre.config.inverse_dtype.itemsize
    out = []
    for rank in range(plan.world_size):
        factors = accumulators = decompositions = 0
        for name, layer in pre.layers.items():
            if name not in plan.a_owner:
                continue
            a, g = layer.a_layout, layer.g_layout
            accumulators += (a.numel + g.numel) * f_size
            factors += a.numel * f_size * (plan.a_owner[name] == rank) + g.numel * f_size * (plan.g_owner[name] == rank)
            if plan.is_grad_worker(name, rank):
                decompositions += pre.config.block_class.decomposition_numel(layer.active_a_layout, g) * i_size
        out.append(
            {
                "factors": factors,
                "accumulators": accumulators,
                "decompositions": decompositions,
                "total": factors + accumulators + decompositions,
            }
        )
    return out


def _spectrum_extremes(pre: KFACPreconditioner, name: str, which: str, running: torch.Tensor | None) -> tuple[float, float] | None:
    """(largest, smallest) eigenvalue of factor ``which`` of layer ``name``: from the
    decomposition this rank holds, else from its running factor (a diagonal factor's values
    are its eigenvalues)."""
    d = pre.decompositions().get(name, {}).get(f"d_{which}")
    if d is None and running is not None:
        d = running.detach().double() if running.dim() == 1 else torch.linalg.eigvalsh(running.detach().double())
    if d is None or d.numel() == 0:
        return None
    d = d.detach().double()
    return float(d.max()), float(d.min())


def _trace(factor: torch.Tensor) -> float:
    factor = factor.detach().double()
    return float(factor.sum() if factor.dim() == 1 else factor.diagonal().sum())


def layer_statistics(pre: KFACPreconditioner) -> dict[str, dict[str, float]]:
    """Per-layer diagnostics: ``trace_A``, ``trace_G``, ``cond`` (an estimate of the condition
    number of the damped Kronecker factor, ``(max d_G max d_A + lambda) / (min d_G min d_A + lambda)``)
    and, in the adaptive mode, ``inv_interval``/``factor_interval``.

    Each rank fills in what it holds (owners: factors; gradient workers: decompositions);
    when distributed, one max-all-reduce of a small vector combines them, so every rank
    returns the same keys. Costs device work and a synchronisation: for diagnostics only.
    """
    names = list(pre.layers)
    if not names:
        return {}
    device = next(iter(pre.layers.values())).weight.device
    width = 8  # trace_A, trace_G, max_A, -min_A, max_G, -min_G, inv_interval, factor_interval
    table = torch.full((len(names), width), float("-inf"), dtype=torch.float64, device=device)
    factors = pre.factors()
    for i, name in enumerate(names):
        running_a, running_g = factors.get(name, (None, None))
        for col, running in ((0, running_a), (1, running_g)):
            if running is not None:
                table[i, col] = _trace(running)
        for col, which, running in ((2, "a", running_a), (4, "g", running_g)):
            extremes = _spectrum_extremes(pre, name, which, running)
            if extremes is not None:
                table[i, col] = extremes[0]
                table[i, col + 1] = -extremes[1]
        tracker = pre.staleness_states.get(name)
        if tracker is not None:
            table[i, 6] = float(tracker.inverse_interval)
            table[i, 7] = float(tracker.factor_interval)
    table = pre.exchange.max_all_reduce(table)  # on K-FAC's own group; nothing on one process
    decompositions = pre.decompositions()
    out: dict[str, dict[str, float]] = {}
    for name, row in zip(names, table.cpu().tolist()):
        # the damping of the layer's last inversion (the current one before the first)
        damping = float(decompositions.get(name, {}).get("damping") or pre.damping)
        values: dict[str, float] = {}
        if math.isfinite(row[0]):
            values["trace_A"] = row[0]
        if math.isfinite(row[1]):
            values["trace_G"] = row[1]
        if all(math.isfinite(v) for v in row[2:6]):
            top = row[4] * row[2] + damping
            bottom = max(-row[5], 0.0) * max(-row[3], 0.0) + damping
            values["cond"] = top / bottom
        if math.isfinite(row[6]):
            values["inv_interval"] = row[6]
            values["factor_interval"] = row[7]
        if values:
            out[name] = values
    return out


# --- fit-start summary ---------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ranks(ranks: tuple[int, ...], world: int) -> str:
    if len(ranks) == world and world > 1:
        return "all"
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def fit_summary(
    pre: KFACPreconditioner,
    hyperparameters: dict[str, Any] | None = None,
    adaptive: StalenessConfig | None = None,
    max_rows: int = 24,
) -> str:
    """One screen: preconditioned layers (kind, factor shapes, owners, gradient workers),
    skipped layers and why, the distribution mode, and the estimated memory per rank."""
    plan = pre.prospective_plan()
    layers = {n: layer for n, layer in pre.layers.items() if n in plan.a_owner}
    skipped = pre.skipped + pre.frozen_layers()
    config = pre.config
    lines = [
        f"K-FAC: {len(layers)} layer(s) preconditioned, {len(skipped)} skipped | world size {plan.world_size}, "
        f"{plan.mode} ({plan.grad_workers} gradient worker(s) per layer) | {config.inverse_method}, "
        f"factors {str(config.factor_dtype).removeprefix('torch.')}, "
        f"inverses {str(config.inverse_dtype).removeprefix('torch.')}"
    ]
    if hyperparameters:
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in hyperparameters.items())
        lines.append(f"  hyperparameters at start: {hp}")
    if adaptive is not None:
        lines.append(
            f"  adaptive intervals: threshold {adaptive.threshold:g}, inversions every "
            f"{adaptive.min_interval}..{adaptive.max_interval} steps, x{adaptive.growth:g} / x{adaptive.shrink:g}, "
            f"change of the {'damped' if adaptive.damped else 'raw'} factors"
            f"{' net of sampling noise' if adaptive.noise_corrected else ''}"
            f"{f', probe_after={adaptive.probe_after}: a run of {adaptive.probe_after} changes in the hold band grows the interval' if adaptive.probe_after else ''}"
        )
    if layers:
        rows = [("layer", "kind", "A", "G", "owner A/G", "workers")]
        order = sorted(layers, key=lambda n: -(layers[n].a_dim ** 3 + layers[n].g_dim ** 3))
        shown = set(order[:max_rows])
        for name, layer in layers.items():
            if name not in shown:
                continue
            rows.append(
                (
                    name or "(model)",
                    layer.kind,
                    layer.a_layout.describe(),
                    layer.g_layout.describe(),
                    f"{plan.a_owner[name]}/{plan.g_owner[name]}",
                    _ranks(plan.grad_worker_ranks(name), plan.world_size),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if len(layers) > max_rows:
            hidden = [layers[n] for n in order[max_rows:]]
            elements = sum(layer.a_layout.numel + layer.g_layout.numel for layer in hidden)
            lines.append(f"  ... and {len(hidden)} smaller layer(s) ({elements} factor elements)")
    if skipped:
        lines.append("  skipped (plain gradient):")
        shown_skips = skipped[:max_rows]
        width = max(len(s.name or "(model)") for s in shown_skips)
        for s in shown_skips:
            lines.append(f"    {(s.name or '(model)').ljust(width)}  {s.kind}: {s.reason}")
        if len(skipped) > max_rows:
            lines.append(f"    ... and {len(skipped) - max_rows} more")
    memory = estimated_memory(pre, plan)
    if memory and layers:
        worst = max(range(len(memory)), key=lambda r: memory[r]["total"])
        m = memory[worst]
        lines.append(
            f"  estimated memory, rank {worst} (the most loaded): {format_bytes(m['total'])} = factors "
            f"{format_bytes(m['factors'])} + step accumulators {format_bytes(m['accumulators'])} + decompositions "
            f"{format_bytes(m['decompositions'])}"
        )
        if len(memory) > 1:
            per_rank = ", ".join(f"{r}: {format_bytes(m['total'])}" for r, m in enumerate(memory[:16]))
            lines.append(f"  per rank: {per_rank}{' ...' if len(memory) > 16 else ''}")
    return "\n".join(lines)
