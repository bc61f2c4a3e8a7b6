"""Curvature blocks: one class per inverse method, one instance per layer (``base.py`` states
the contract). :class:`~lightning_kfac.engine.config.KFACConfig` picks the class."""

from lightning_kfac.engine.blocks.base import CurvatureBlock
from lightning_kfac.engine.blocks.cholesky import CholeskyBlock
from lightning_kfac.engine.blocks.eigen import EigenBlock, FactoredEigenBlock

__all__ = ["CholeskyBlock", "CurvatureBlock", "EigenBlock", "FactoredEigenBlock"]
