"""Distributed plumbing for K-FAC: work assignment and fused collectives (torch.distributed only)."""

from lightning_kfac.distributed.assignment import LayerShape, WorkPlan, balance_lower_bound, lpt_assign

__all__ = ["LayerShape", "WorkPlan", "balance_lower_bound", "lpt_assign"]
