"""The three phases of a K-FAC step, in order (``docs/design.md``): factor update, inversion,
preconditioning. Functions of the preconditioner whose parts they drive; the preconditioner
calls them from ``step()``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_kfac.distributed.assignment import WorkPlan
from lightning_kfac.distributed.exchange import Totals, sides_of
from lightning_kfac.engine import curvature
from lightning_kfac.engine.notices import warn

if TYPE_CHECKING:
    from lightning_kfac.engine.preconditioner import KFACPreconditioner


def update_factors(pre: KFACPreconditioner, due: frozenset[str], grad_scale: float | Tensor | None) -> None:
    """The due layers' factor sums reduced to their owners (layers recording for the first time
    join), averaged into the running factors; the AMP scale divided out of G."""
    pre.recorder.learn_expected_calls()
    registered = list(pre.blocks)
    due_order = [n for n in registered if n in due]
    batches, totals = pre.exchange.finish_factor_step(
        due_order, registered, pre.plan, pre.recorder, lambda names, totals: join(pre, names, totals)
    )
    correction = _inverse_square(grad_scale)
    for (name, side), (batch, mean_scale) in batches.items():
        scale: float | Tensor = mean_scale
        if side == "g" and correction is not None:
            scale = mean_scale * correction
        observe = pre.schedule.observer(name, side) if measures_change(pre, name) else None
        if not pre.blocks[name].update(side, batch, scale, pre.hyperparameters.factor_decay, observe):
            pre.note_nonfinite(name)
    updated = [n for n in pre.roster.planned() if n in due]
    for name in updated:
        block, (rows_a, rows_g) = pre.blocks[name], totals[name]
        block.a_updates += int(rows_a > 0)
        block.g_updates += int(rows_g > 0)
        if min(rows_a, rows_g) > 0:
            pre.recorder.row_scales[name] = row_scale(pre, totals[name])
    pre.schedule.after_factor_update(updated, pre.steps)
    pre.roster.note_silent(due_order, totals)


def join(pre: KFACPreconditioner, names: list[str], totals: Totals) -> WorkPlan:
    """Layers that recorded for the first time (on some rank) join, the same way everywhere."""
    plan = pre.roster.join(names)
    for name in names:
        pre.recorder.row_scales[name] = row_scale(pre, totals[name])
        pre.schedule.join(name, pre.steps)
    return plan


def row_scale(pre: KFACPreconditioner, totals: tuple[float, float]) -> tuple[float, float]:
    return max(1.0, totals[0] / pre.world_size), max(1.0, totals[1] / pre.world_size)


def measures_change(pre: KFACPreconditioner, name: str) -> bool:
    """This rank holds both factors of the layer, so it measures the layer's staleness."""
    plan = pre.plan
    return pre.schedule.config is not None and plan.a_owner.get(name) == plan.g_owner.get(name) == pre.rank


def inversion_due(pre: KFACPreconditioner, name: str) -> bool:
    """A training layer with factors, due by the schedule, never decomposed, or whose bias
    froze or thawed since."""
    block = pre.blocks[name]
    if not (block.has_factors and block.layer.trains):
        return False
    return pre.schedule.inversion_due(name, pre.steps) or block.inversions == 0 or block.reshaped


def invert(pre: KFACPreconditioner, names: list[str]) -> None:
    """Owners decompose ``names`` (measuring staleness first in the adaptive mode), gradient
    workers receive the decompositions."""
    for name, block in pre.blocks.items():  # read once per inversion, which synchronises anyway
        pre.note_nonfinite(name, block.take_nonfinite_count())
    plan, damping = pre.plan, pre.hyperparameters.damping
    pre.schedule.before_inversion(
        names, pre.steps, pre.blocks, lambda name: measures_change(pre, name), pre.exchange.agree_intervals
    )
    for name in names:
        pre.decomposition_failures += pre.blocks[name].decompose(sides_of(plan, name, pre.rank), damping)
    if not pre.damping_checked:
        check_damping(pre, names)
    pre.exchange.broadcast_decompositions(plan, pre.blocks, names)
    for name in names:
        pre.blocks[name].finish(damping, plan.is_grad_worker(name, pre.rank))
    pre.inversions += 1
    pre.layer_inversions += len(names)
    pre.last_inversion_step = pre.steps


def check_damping(pre: KFACPreconditioner, names: list[str]) -> None:
    """Once, at the first inversion, on rank 0 (the factors it owns): a damping above every
    Kronecker eigenvalue makes the preconditioner about I / damping, i.e. SGD at lr / damping.
    tr(A) tr(G) bounds the largest eigenvalue of A (x) G from above."""
    pre.damping_checked = True
    bounds = {}
    for name in names:
        block = pre.blocks[name]
        a, g = block.active_factor("a"), block.running_g
        if pre.rank == 0 and a is not None and g is not None:
            trace_a = a.sum() if a.dim() == 1 else a.diagonal().sum()
            bounds[name] = float(trace_a) * float(g.diagonal().sum())
    damping = pre.hyperparameters.damping
    if bounds and damping > max(bounds.values()):
        largest = max(bounds, key=bounds.__getitem__)
        where = f"layer {largest!r}" if largest else "the model (a single layer)"
        warn(
            f"K-FAC: damping {damping:g} exceeds every Kronecker eigenvalue of the layers' factors (at most "
            f"{bounds[largest]:.3g}, in {where}), so the preconditioner is close to I / damping: K-FAC then steps "
            f"like SGD with the learning rate divided by {damping:g}. Lower the damping; the measured settings are "
            "in the README, 'When K-FAC helps, and how to set it'."
        )


def precondition(pre: KFACPreconditioner, ready: list[str], lr: float | None) -> None:
    """Gradient workers precondition ``ready`` layers, the others receive the results; the KL
    clip scales them all; V' is written into the parameters' gradients."""
    grads = {name: pre.blocks[name].layer.grad_matrix() for name in ready}
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    preconditioned: dict[str, Tensor] = {}
    for name in ready:
        layer, grad = pre.blocks[name].layer, grads[name]
        shapes[name] = (layer.g_dim, layer.active_a_layout.dim), grad.dtype if grad is not None else layer.weight.dtype
        if pre.plan.is_grad_worker(name, pre.rank):
            v = (
                grad
                if grad is not None
                else torch.zeros(shapes[name][0], dtype=shapes[name][1], device=layer.weight.device)
            )
            preconditioned[name] = pre.blocks[name].precondition(v)
    pre.exchange.share_gradients(pre.plan, ready, shapes, preconditioned)
    scale = kl_scale(pre, ready, grads, preconditioned, lr)
    for name, out in preconditioned.items():
        if grads[name] is not None:
            pre.blocks[name].layer.write_grad(out, None if scale is None else scale.to(out.dtype))


def kl_scale(
    pre: KFACPreconditioner,
    ready: list[str],
    grads: dict[str, Tensor | None],
    preconditioned: dict[str, Tensor],
    lr: float | None,
) -> Tensor | None:
    """nu of the KL clip (None when it is off); the learning rate from ``lr`` or the engine's."""
    kl_clip, pre.last_kl_scale = pre.hyperparameters.kl_clip, None
    if kl_clip is None:
        return None
    lr_value = lr if lr is not None else (pre.lr() if callable(pre.lr) else pre.lr)
    if lr_value is None:
        raise ValueError(
            "kl_clip is set but no learning rate is known: pass lr to step(), or lr= to KFACPreconditioner, "
            "or set kl_clip=None"
        )
    pairs = [(preconditioned[name], grad) for name in ready if (grad := grads[name]) is not None]
    pre.last_kl_scale = curvature.kl_clip_scale_of(pairs, float(lr_value), kl_clip)
    return pre.last_kl_scale


def _inverse_square(grad_scale: float | Tensor | None) -> float | Tensor | None:
    """1 / grad_scale^2 in float64 (float32 on MPS): a loss scale of 2**16 squared overflows
    float16, so the correction is never formed in the factor dtype."""
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, Tensor):
        return 1.0 / (float(grad_scale) ** 2)
    wide = torch.float32 if grad_scale.device.type == "mps" else torch.float64
    return grad_scale.to(wide).square().reciprocal()
