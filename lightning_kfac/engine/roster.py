"""Which registered layers take part, and since when.

Every supported layer is registered (frozen or not); it joins the work plan on the first factor
update in which its hooks recorded on some rank, the same way on every rank (row counts travel
to all). Until then it keeps its plain gradient. A trainable layer that records nothing on any
rank for :data:`SILENT_AFTER_FACTOR_UPDATES` factor updates is reported once (its module is
probably used functionally, like ``MultiheadAttention.out_proj``); it joins if it fires later.
A layer missing from a loaded state starts afresh, said once when it joins.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan
from lightning_kfac.engine.layers import KFACLayer, SkippedLayer
from lightning_kfac.engine.notices import warn

#: factor updates a trainable layer may stay silent on every rank before it is reported: more
#: than one, so a layer that sits out the first step is not mistaken for one used functionally
SILENT_AFTER_FACTOR_UPDATES = 3


class LayerRoster:
    """The registered layers, the work plan of those that joined, and what was reported."""

    def __init__(self, layers: dict[str, KFACLayer], skipped: list[SkippedLayer], plan: WorkPlan) -> None:
        self.registered = layers
        #: modules left out at registration, and layers reported as never firing
        self.skipped = skipped
        self.plan = plan
        self.silent: set[str] = set()
        self._silent_updates: dict[str, int] = {}
        #: layers of the last loaded state (None: nothing loaded)
        self.loaded: set[str] | None = None

    def planned(self) -> list[str]:
        """Layers in the work plan, in registration order."""
        return [n for n in self.registered if n in self.plan.a_owner]

    def waiting(self) -> list[str]:
        """Trainable layers not yet in the plan, not reported silent."""
        return [
            n
            for n, layer in self.registered.items()
            if n not in self.plan.a_owner and layer.trains and n not in self.silent
        ]

    def active(self) -> dict[str, KFACLayer]:
        """Registered layers, less those reported as never firing."""
        return {n: layer for n, layer in self.registered.items() if n not in self.silent}

    def frozen(self) -> list[SkippedLayer]:
        """Registered layers whose weight does not train now: plain gradient until it does."""
        reason = "frozen (weight.requires_grad=False); preconditioned once it trains"
        return [SkippedLayer(n, layer.kind, reason) for n, layer in self.registered.items() if not layer.trains]

    def shapes(self, names: Iterable[str]) -> list[LayerShape]:
        return [LayerShape(n, self.registered[n].a_dim, self.registered[n].g_dim) for n in names]

    def join(self, names: list[str]) -> WorkPlan:
        """``names`` join the plan (deterministic: the same plan on every rank)."""
        self.plan = self.plan.extended(self.shapes(n for n in names if n not in self.plan.a_owner))
        for name in names:
            if name in self.silent:  # reported silent, fired after all
                self.silent.discard(name)
                self.skipped = [s for s in self.skipped if s.name != name]
        fresh = [n for n in names if self.loaded is not None and n not in self.loaded]
        if fresh:
            warn(
                f"K-FAC: {', '.join(fresh)} not in the loaded K-FAC state (new, or frozen when it was saved); "
                "its factors start afresh"
            )
            self.loaded = (self.loaded or set()) | set(fresh)
        return self.plan

    def note_silent(self, due: Iterable[str], rows: dict[str, tuple[float, float]]) -> None:
        """After a factor update: count it for each due, trainable layer still outside the plan,
        and report those silent for long enough (once, together)."""
        reported = []
        for name in due:
            layer = self.registered[name]
            if name in self.plan.a_owner or name in self.silent or not layer.trains:
                continue
            self._silent_updates[name] = self._silent_updates.get(name, 0) + 1
            if self._silent_updates[name] < SILENT_AFTER_FACTOR_UPDATES:
                continue
            why = (
                "its output never received a gradient (not part of the loss?)"
                if rows[name][0]
                else "hooks never fired (used functionally?)"
            )
            self.skipped.append(SkippedLayer(name, layer.kind, f"{why}; plain gradient until they fire"))
            self.silent.add(name)
            reported.append(name)
        if reported:
            warn(
                f"K-FAC: the hooks of {', '.join(reported)} never fired in the first "
                f"{SILENT_AFTER_FACTOR_UPDATES} factor "
                "updates on any rank (the module is probably used functionally, e.g. MultiheadAttention.out_proj); "
                "they keep their plain gradient unless they fire later"
            )
