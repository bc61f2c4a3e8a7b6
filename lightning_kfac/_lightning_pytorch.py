"""The strategy and callback bound to the ``lightning.pytorch`` namespace.

``lightning.pytorch`` and ``pytorch_lightning`` are two copies of Lightning with two strategy
registries; a strategy or callback class of one is rejected by the other's ``Trainer``. This
module (imported by ``import lightning_kfac`` where the ``lightning`` package is installed, and
reachable as ``lightning_kfac.lightning_pytorch``) provides:

* :class:`KFACDDPStrategy`: the same K-FAC logic mixed into ``lightning.pytorch``'s
  ``DDPStrategy``, registered there as ``"kfac_ddp"``;
* :class:`KFACCallback`: ``lightning_kfac.KFACCallback`` made a ``lightning.pytorch.Callback``
  as well (a subclass of both, so it behaves exactly like the original).

    import lightning.pytorch as L
    import lightning_kfac
    trainer = L.Trainer(strategy="kfac_ddp")
"""

from __future__ import annotations

import lightning.pytorch as _lp
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies import StrategyRegistry

from lightning_kfac.callback import KFACCallback as _KFACCallback
from lightning_kfac.strategy import KFACDDPStrategy as _PLStrategy
from lightning_kfac.strategy import _KFACStrategyBase, register

__all__ = ["KFACCallback", "KFACDDPStrategy"]

#: ``lightning_kfac.KFACCallback`` as a ``lightning.pytorch.Callback`` (derived programmatically,
#: so it follows the original's code whatever it becomes)
KFACCallback = type(
    "KFACCallback",
    (_KFACCallback, _lp.Callback),
    {"__module__": __name__, "__qualname__": "KFACCallback", "__doc__": _KFACCallback.__doc__},
)


# the shared logic types its trainer as pytorch_lightning's; this class serves lightning.pytorch's
class KFACDDPStrategy(_KFACStrategyBase, _DDPStrategy):  # type: ignore[misc]
    __doc__ = (
        "``lightning.pytorch`` version of :class:`lightning_kfac.KFACDDPStrategy` (same arguments, same behaviour).\n\n"
        + (_PLStrategy.__doc__ or "").split("\n\n", 1)[-1]
    )

    @classmethod
    def _callback_class(cls) -> type:
        return KFACCallback


register(StrategyRegistry, KFACDDPStrategy)
