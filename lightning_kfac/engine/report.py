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

from lightning_kfac.distributed.assignment import WorkPlan

if TYPE_CHECKING:
    from lightning_kfac.engine.preconditioner import KFACPreconditioner
    from lightning_kfac.engine.staleness import StalenessConfig


def memory_usage(pre: KFACPreconditioner) -> dict[str, int]:
    """Bytes this rank holds (running factors, decompositions) and the factor total of a fully
    replicated scheme."""
    itemsize = pre.config.factor_dtype.itemsize
    usage = {"factors": 0, "decompositions": 0, "replicated_factors": 0}
    for block in pre.blocks.values():
        usage["replicated_factors"] += (block.layout("a").numel + block.layout("g").numel) * itemsize
        for key, tensor in block.held_tensors().items():
            usage["factors" if key.startswith("running") else "decompositions"] += (
                tensor.numel() * tensor.element_size()
            )
    return usage


def decompositions(pre: KFACPreconditioner) -> dict[str, dict[str, Any]]:
    """Eigenvalues (``d_a``, ``d_g``; eigen) or damped inverses (``a_inv``, ``g_inv``; cholesky)
    of each layer this rank preconditions, with the damping they used."""
    out: dict[str, dict[str, Any]] = {}
    for name, block in pre.blocks.items():
        values = {k: getattr(block, k) for k in ("d_a", "d_g", "a_inv", "g_inv") if getattr(block, k, None) is not None}
        if values:
            out[name] = {**values, "damping": block.damping}
    return out


def first_order_parameters(pre: KFACPreconditioner) -> list[str]:
    """Trainable parameters K-FAC leaves to their plain gradient (norms, skipped layers,
    free-standing parameters such as MultiheadAttention's in_proj_weight)."""
    model = pre.model
    if model is None:
        return []
    covered = {id(p) for layer in pre.layers.values() for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]


def prospective_plan(pre: KFACPreconditioner) -> WorkPlan:
    """The plan with every trainable registered layer added as if it recorded (local; for
    summaries): before the first step, as the first step would plan it for the world size now."""
    roster, config = pre.roster, pre.config
    shapes = roster.shapes(roster.waiting())
    if not roster.plan.a_owner:
        workers = config.grad_workers_per_layer(pre.world_size)
        return type(roster.plan).build(shapes, pre.world_size, workers, config.assignment_cost, config.split_factors)
    return roster.plan.extended(shapes) if shapes else roster.plan


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


def _spectrum_extremes(
    pre: KFACPreconditioner, name: str, which: str, running: torch.Tensor | None
) -> tuple[float, float] | None:
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
    for name, row in zip(names, table.cpu().tolist(), strict=True):
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
    """One screen, true from the first step: the preconditioned layers (kind, factor shapes; owners
    and gradient workers when there are several ranks), the layers left out and why, the
    first-order parameters by reason, and the estimated memory."""
    plan = pre.prospective_plan()
    layers = {n: layer for n, layer in pre.layers.items() if n in plan.a_owner}
    skipped = pre.skipped + pre.frozen_layers()
    config = pre.config
    dtypes = f"{str(config.factor_dtype).removeprefix('torch.')} factors"
    lines = [
        f"K-FAC: {len(layers)} layer(s) preconditioned ({config.inverse_method}, {config.damping_mode} damping, "
        f"{dtypes}), {len(skipped)} left out"
    ]
    if plan.world_size > 1:
        lines.append(f"  {plan.world_size} ranks, {plan.mode}: {plan.grad_workers} gradient worker(s) per layer")
    if hyperparameters:
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in hyperparameters.items())
        lines.append(f"  {hp}")
    if adaptive is not None:
        lines.append(_adaptive_line(adaptive))
    lines += _layer_table(layers, plan, max_rows) + _skipped_lines(skipped, max_rows)
    lines += _first_order_lines(pre, {s.name for s in skipped})
    memory = estimated_memory(pre, plan)
    if memory and layers:
        lines += _memory_lines(memory)
    return "\n".join(lines)


def first_order_groups(pre: KFACPreconditioner, left_out: set[str]) -> dict[str, list[str]]:
    """The first-order parameters by reason: the kind of module that holds them (norms, layers
    left out), or "bare parameters" of a module that is not a layer (MultiheadAttention's
    in_proj_weight, positional embeddings)."""
    model = pre.model
    if model is None:
        return {}
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}
    for name in pre.first_order_parameters():
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        kind = type(module).__name__ if module is not None else "?"
        if owner in left_out:
            reason = f"layers left out ({kind})"
        elif isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)):
            reason = f"normalisation ({kind})"
        else:
            reason = f"bare parameters of {kind}"
        groups.setdefault(reason, []).append(name)
    return groups


def _first_order_lines(pre: KFACPreconditioner, left_out: set[str], shown: int = 3) -> list[str]:
    groups = first_order_groups(pre, left_out)
    if not groups:
        return []
    count = sum(len(names) for names in groups.values())
    lines = [f"  first-order (plain gradient): {count} parameter tensor(s)"]
    for reason, names in groups.items():
        more = f" (+{len(names) - shown})" if len(names) > shown else ""
        lines.append(f"    {reason}: {', '.join(names[:shown])}{more}")
    return lines


def _adaptive_line(adaptive: StalenessConfig) -> str:
    probe = adaptive.probe_after
    return (
        f"  adaptive intervals: threshold {adaptive.threshold:g}, inversions every "
        f"{adaptive.min_interval}..{adaptive.max_interval} steps, x{adaptive.growth:g} / x{adaptive.shrink:g}, "
        f"change of the {'damped' if adaptive.damped else 'raw'} factors"
        f"{' net of sampling noise' if adaptive.noise_corrected else ''}"
        f"{f', probe_after={probe}: a run of {probe} changes in the hold band grows the interval' if probe else ''}"
    )


def _layer_table(layers: dict[str, Any], plan: WorkPlan, max_rows: int) -> list[str]:
    if not layers:
        return []
    distributed = plan.world_size > 1
    rows: list[tuple[str, ...]] = [("layer", "kind", "A", "G", *(("owner A/G", "workers") if distributed else ()))]
    order = sorted(layers, key=lambda n: -(layers[n].a_dim ** 3 + layers[n].g_dim ** 3))
    shown = set(order[:max_rows])
    for name, layer in layers.items():
        if name in shown:
            row: tuple[str, ...] = (name or "(model)", layer.kind, layer.a_layout.describe(), layer.g_layout.describe())
            if distributed:
                workers = _ranks(plan.grad_worker_ranks(name), plan.world_size)
                row += (f"{plan.a_owner[name]}/{plan.g_owner[name]}", workers)
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if len(layers) > max_rows:
        hidden = [layers[n] for n in order[max_rows:]]
        elements = sum(layer.a_layout.numel + layer.g_layout.numel for layer in hidden)
        lines.append(f"  ... and {len(hidden)} smaller layer(s) ({elements} factor elements)")
    return lines


def _skipped_lines(skipped: list[Any], max_rows: int) -> list[str]:
    if not skipped:
        return []
    lines = ["  left out (plain gradient):"]
    shown = skipped[:max_rows]
    width = max(len(s.name or "(model)") for s in shown)
    lines += [f"    {(s.name or '(model)').ljust(width)}  {s.kind}: {s.reason}" for s in shown]
    if len(skipped) > max_rows:
        lines.append(f"    ... and {len(skipped) - max_rows} more")
    return lines


def _memory_lines(memory: list[dict[str, int]]) -> list[str]:
    worst = max(range(len(memory)), key=lambda r: memory[r]["total"])
    m = memory[worst]
    where = f", rank {worst} (the most loaded)" if len(memory) > 1 else ""
    lines = [
        f"  estimated memory{where}: {format_bytes(m['total'])} = factors {format_bytes(m['factors'])} + step "
        f"accumulators {format_bytes(m['accumulators'])} + decompositions {format_bytes(m['decompositions'])}"
    ]
    if len(memory) > 1:
        per_rank = ", ".join(f"{r}: {format_bytes(m['total'])}" for r, m in enumerate(memory[:16]))
        lines.append(f"  per rank: {per_rank}{' ...' if len(memory) > 16 else ''}")
    return lines


class TimingWindow:
    """The engine's running totals at the previous log, so that the next log reports means per
    optimizer step over the steps in between (amortised costs, whatever the intervals)."""

    def __init__(self) -> None:
        self.steps = 0
        self.totals: dict[str, float] = {}
        self.bytes = 0
        self.synced_ms = 0.0
        self.synced_steps = 0

    def reset(self, pre: KFACPreconditioner) -> None:
        self.steps, self.totals, self.bytes = pre.steps, dict(pre.timing_totals_ms), pre.exchange.total_bytes()
        self.synced_ms, self.synced_steps = 0.0, 0

    def add_synced(self, step_ms: float | None) -> None:
        if step_ms is not None:
            self.synced_ms += step_ms
            self.synced_steps += 1

    def advance(self, pre: KFACPreconditioner, step_ms: float | None) -> dict[str, float]:
        steps = max(1, pre.steps - self.steps)
        out = {
            f"time_{part}_ms": (ms - self.totals.get(part, 0.0)) / steps for part, ms in pre.timing_totals_ms.items()
        }
        out["comm_bytes"] = (pre.exchange.total_bytes() - self.bytes) / steps
        if self.synced_steps:
            out["time_step_ms"] = self.synced_ms / self.synced_steps
        self.reset(pre)
        return out
