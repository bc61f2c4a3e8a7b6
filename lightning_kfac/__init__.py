"""lightning-kfac: distributed K-FAC preconditioning for PyTorch Lightning.

    import lightning_kfac
    trainer = Trainer(strategy="kfac_ddp")

Importing the package registers the ``"kfac_ddp"`` strategy string with Lightning (both the
``pytorch_lightning`` and, where installed, the ``lightning.pytorch`` namespace).
"""

from lightning_kfac.engine import KFACConfig, KFACPreconditioner, SkippedLayer

__version__ = "0.1.0"

__all__ = ["KFACCallback", "KFACConfig", "KFACDDPStrategy", "KFACPreconditioner", "SkippedLayer", "__version__"]


def _register_strategies() -> None:
    from pytorch_lightning.strategies import StrategyRegistry

    from lightning_kfac.strategy import register

    register(StrategyRegistry)


try:
    from lightning_kfac.callback import KFACCallback
    from lightning_kfac.strategy import KFACDDPStrategy

    _register_strategies()
except ImportError as _err:  # the engine stays usable in plain torch
    if "pytorch_lightning" not in str(_err):
        raise
