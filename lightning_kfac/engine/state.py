"""The checkpoint schema of :meth:`KFACPreconditioner.state_dict`, its version, and the migration
of older states. Tensors and Python scalars only (checkpoints load with ``weights_only=True``).

Version 2::

    version            2
    steps              optimizer steps taken
    hyperparameters    {damping, factor_update_freq, inv_update_freq, factor_decay, kl_clip}
    inverse_method     "eigen" | "cholesky"
    damping_mode       "factored" | "exact" (absent in states written before; then the mode
                       that was the method's only or default one: exact for eigen)
    inversions         steps that inverted at least one layer; layer_inversions: their total
    adaptive           per-layer interval trackers (stale statistics) or None
    has_factors        any layer has factors; has_inverse: any layer is decomposed
    inverse_damping    {layer: damping of its decomposition in force}
    layers             {layer: {running_a, running_g, <decomposition keys>}}: every owner's
                       tensors, gathered from all ranks
    layer_meta         {layer: {a_updates, g_updates, inversions, decomposed_with_bias,
                       row_scale}}
    last_inversion_step  the engine step of the last inversion (None before one)
    last_updates       {factors: {layer: step}, inversions: {layer: step}}: each layer's last
                       factor update and inversion (absent in states written before; then the
                       next update comes at the next multiple of the interval, as it did)

Version 1 (before release 0.2) had no ``layer_meta`` (the counters are inferred from which
tensors a layer has) and could hold ``inverse_damping`` as one number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_kfac.distributed.exchange import owner_of
from lightning_kfac.engine.blocks.base import CurvatureBlock
from lightning_kfac.engine.notices import warn

if TYPE_CHECKING:
    from lightning_kfac.engine.preconditioner import KFACPreconditioner

STATE_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)


def check_version(state: Any) -> None:
    if not isinstance(state, dict) or state.get("version") not in SUPPORTED_VERSIONS:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(
            f"not a lightning_kfac state (versions {SUPPORTED_VERSIONS} are read; got version {version!r}, keys {keys})"
        )


def migrate(state: dict[str, Any], blocks: dict[str, CurvatureBlock]) -> dict[str, Any]:
    """``state`` in the current version (a new dict; the argument is not changed)."""
    check_version(state)
    if state["version"] == STATE_VERSION:
        return state
    migrated = dict(state, version=STATE_VERSION)
    damping = state.get("inverse_damping", {})
    if not isinstance(damping, dict):  # one number for every layer
        damping = dict.fromkeys(state["layers"], damping)
    migrated["inverse_damping"] = damping
    meta = dict(state.get("layer_meta") or {})
    for name, saved in state["layers"].items():
        if name not in meta and name in blocks:
            meta[name] = _inferred_meta(saved, blocks[name])
    migrated["layer_meta"] = meta
    return migrated


def _inferred_meta(saved: dict[str, Tensor], block: CurvatureBlock) -> dict[str, Any]:
    """Counters of a layer saved before they were recorded: from the tensors it has (the code
    of that time always decomposed A with its bias column)."""
    decomposed = any(key in saved for key in block.decomposition_keys)
    return {
        "a_updates": int("running_a" in saved),
        "g_updates": int("running_g" in saved),
        "inversions": int(decomposed),
        "decomposed_with_bias": (True if decomposed else None) if block.layer.has_bias else None,
    }


def check_shapes(layers: dict[str, dict[str, Tensor]], blocks: dict[str, CurvatureBlock]) -> None:
    """Refuse a state whose tensors do not fit this model's layers, naming what differs."""
    for name, saved in layers.items():
        block = blocks.get(name)
        if block is None:
            continue
        for key, value in saved.items():
            allowed = block.allowed_shapes(key)
            if tuple(value.shape) not in allowed:
                side = "A" if key.endswith("_a") or key == "a_inv" else "G"
                raise ValueError(
                    f"K-FAC state does not fit this model: layer {name!r} factor {side} ({key}) has shape "
                    f"{tuple(value.shape)} in the state, this model's {block.layer.kind} needs {allowed[0]}"
                )


#: the damping mode of states that do not record one
_FORMER_DAMPING = {"eigen": "exact", "cholesky": "factored"}


def check_method(state: dict[str, Any], inverse_method: str, damping_mode: str) -> None:
    """A state decomposed with another inverse method is refused. Another damping mode is
    allowed (the decompositions do not depend on it) and said once: the steps change."""
    if state["inverse_method"] != inverse_method and state["has_inverse"]:
        raise ValueError(
            f"the state was saved with inverse_method={state['inverse_method']!r}, this preconditioner "
            f"uses {inverse_method!r}"
        )
    saved_mode = state.get("damping_mode", _FORMER_DAMPING.get(state["inverse_method"]))
    if saved_mode != damping_mode and state["has_inverse"]:
        warn(
            f"K-FAC: the state was saved with damping_mode={saved_mode!r}; this preconditioner uses "
            f"{damping_mode!r} from now on (pass damping_mode={saved_mode!r} to continue as before)"
        )


def capture(pre: KFACPreconditioner) -> dict[str, Any]:
    """The state of ``pre`` in the current version (collective when distributed: the owners'
    tensors are gathered to every rank)."""
    planned = pre.roster.planned()
    blocks, row_scales = pre.blocks, pre.recorder.row_scales
    return {
        "version": STATE_VERSION,
        "steps": pre.steps,
        "hyperparameters": pre.hyperparameters.as_dict(),
        "inverse_method": pre.config.inverse_method,
        "damping_mode": pre.config.damping_mode,
        "inversions": pre.inversions,
        "layer_inversions": pre.layer_inversions,
        "last_inversion_step": pre.last_inversion_step,
        "adaptive": pre.schedule.state_dict(),
        "last_updates": pre.schedule.last_updates(),
        "has_factors": pre.has_factors,
        "has_inverse": pre.has_inverse,
        "inverse_damping": {n: blocks[n].damping for n in planned if blocks[n].damping is not None},
        "layers": pre.exchange.gather_state(pre.plan, blocks, planned),
        "layer_meta": {n: {**blocks[n].meta(), "row_scale": list(row_scales.get(n, (1.0, 1.0)))} for n in planned},
    }


def restore(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    """Put ``state`` (any supported version, any world size) in force on ``pre`` at once."""
    state = migrate(state, pre.blocks)
    check_method(state, pre.config.inverse_method, pre.config.damping_mode)
    check_shapes(state["layers"], pre.blocks)
    pre.hyperparameters.load(state["hyperparameters"])
    pre.steps = int(state["steps"])
    pre.recorder.step = pre.steps
    pre.inversions, pre.layer_inversions = int(state.get("inversions", 0)), int(state.get("layer_inversions", 0))
    pre.last_inversion_step = state.get("last_inversion_step")
    layers, meta, damping = state["layers"], state["layer_meta"], state["inverse_damping"]
    unknown = sorted(set(layers) - set(pre.blocks))
    if unknown:
        warn(f"K-FAC state has layers this model does not precondition: {unknown}")
    roster = pre.roster
    for name in roster.planned():
        if name not in layers:  # planned here, absent there: afresh
            pre.blocks[name].reset_factors()
    saved = [n for n in pre.blocks if n in layers]
    roster.join(saved)
    roster.loaded = set(layers)
    plan, rank = roster.plan, pre.rank
    for name in saved:
        worker = plan.is_grad_worker(name, rank)

        def keep(key: str, name: str = name, worker: bool = worker) -> bool:
            return owner_of(plan, name, key) == rank if key.startswith("running") else worker

        block = pre.blocks[name]
        block.load(layers[name], {**meta[name], "damping": damping.get(name)}, keep)
        block.restore(worker)
        scale = meta[name].get("row_scale", (1.0, 1.0))
        pre.recorder.row_scales[name] = (float(scale[0]), float(scale[1]))
    for name in pre.blocks:
        pre.schedule.join(name, pre.steps)
    pre.schedule.load_state_dict(state.get("adaptive"))
    pre.schedule.load_last_updates(state.get("last_updates"), pre.steps, saved)
