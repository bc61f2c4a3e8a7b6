"""lightning-kfac: distributed K-FAC preconditioning for PyTorch Lightning.

    import lightning_kfac
    trainer = Trainer(strategy="kfac_ddp")

Importing the package registers the ``"kfac_ddp"`` strategy string with Lightning: in the
``pytorch_lightning`` namespace (``lightning_kfac.KFACDDPStrategy``, ``lightning_kfac.KFACCallback``)
and, where the ``lightning`` package is installed, in the ``lightning.pytorch`` namespace
(``lightning_kfac.lightning_pytorch.KFACDDPStrategy`` and ``.KFACCallback``).
"""

import importlib.util as _importlib_util
import sys as _sys
import warnings as _warnings

from lightning_kfac.engine import KFACConfig, KFACPreconditioner, SkippedLayer

__version__ = "0.1.0"

__all__ = ["KFACCallback", "KFACConfig", "KFACDDPStrategy", "KFACPreconditioner", "SkippedLayer", "__version__"]


def _register_strategies() -> None:
    from pytorch_lightning.strategies import StrategyRegistry

    from lightning_kfac.strategy import register

    register(StrategyRegistry)


def _register_lightning_pytorch():
    """Bind and register the strategy in ``lightning.pytorch`` when that package is installed;
    returns the module holding the bound classes, or None."""
    try:
        if _importlib_util.find_spec("lightning") is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from lightning_kfac import _lightning_pytorch
    except ImportError:  # an unrelated or partial "lightning" package
        return None
    except Exception as err:  # a broken lightning install must not break lightning_kfac
        _warnings.warn(f"lightning_kfac: could not register kfac_ddp with lightning.pytorch: {err!r}", stacklevel=2)
        return None
    # public name for the bound classes: lightning_kfac.lightning_pytorch (also for class_path)
    _sys.modules.setdefault(__name__ + ".lightning_pytorch", _lightning_pytorch)
    return _lightning_pytorch


try:
    from lightning_kfac.callback import KFACCallback
    from lightning_kfac.strategy import KFACDDPStrategy

    _register_strategies()
except ImportError as _err:  # the engine stays usable in plain torch
    if "pytorch_lightning" not in str(_err):
        raise
else:
    lightning_pytorch = _register_lightning_pytorch()
