"""The K-FAC engine: pure torch, no Lightning import (``docs/design.md``)."""

from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.layers import SkippedLayer
from lightning_kfac.engine.preconditioner import KFACPreconditioner

__all__ = ["KFACConfig", "KFACPreconditioner", "SkippedLayer"]
