"""The K-FAC engine: pure torch, no Lightning import."""

from lightning_kfac.engine.config import KFACConfig
from lightning_kfac.engine.preconditioner import KFACPreconditioner, SkippedLayer

__all__ = ["KFACConfig", "KFACPreconditioner", "SkippedLayer"]
