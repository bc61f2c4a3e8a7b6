"""Structural K-FAC options, fixed for the life of a preconditioner.

Hyperparameters that may change from step to step (damping, update intervals, decay, KL clip)
live on the preconditioner itself; everything here decides shapes, placement or dtypes and is
validated once, at construction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_kfac.engine.blocks import CholeskyBlock, CurvatureBlock, EigenBlock, FactoredEigenBlock
from lightning_kfac.engine.validation import (
    check_choice,
    check_float_dtype,
    check_fraction,
    check_positive_float,
    check_positive_int,
)

#: the curvature block of each (inverse method, damping mode): the one place names select code
BLOCK_CLASSES: dict[tuple[str, str], type[CurvatureBlock]] = {
    ("eigen", "factored"): FactoredEigenBlock,
    ("eigen", "exact"): EigenBlock,
    ("cholesky", "factored"): CholeskyBlock,
}
INVERSE_METHODS = ("eigen", "cholesky")
DAMPING_MODES = ("factored", "exact")
ASSIGNMENT_COSTS = ("compute", "memory")


@dataclass(frozen=True)
class KFACConfig:
    """Validated structural options of :class:`~lightning_kfac.KFACPreconditioner`.

    Args:
        inverse_method: ``"cholesky"`` (damped inverses from Cholesky factorisations; factored
            damping only; the default: the cheaper decomposition, and two products per step
            instead of four) or ``"eigen"`` (eigendecompositions; either damping).
        damping_mode: ``"factored"`` (the default), Tikhonov damping of each factor with the
            pi balance, (G + sqrt(l)/pi I)^-1 V (A + pi sqrt(l) I)^-1; or ``"exact"``, damping
            of the Kronecker product, (G (x) A + l I)^-1 vec(V) (eigen only; it needed 3-4x the
            steps of factored damping at large batches, README "Results"). See
            ``docs/conventions.md``.
        factor_samples: at most this many samples (rows of the batch dimension) of each layer
            call enter A and G, drawn at random without replacement on each rank (the same draw
            for every layer and call of a step), scaled so that both estimates stay unbiased:
            the cost of the factor statistics stops growing with the batch. ``None``: all.
        factor_dtype: dtype the factors are accumulated, averaged and stored in.
        inverse_dtype: dtype the decompositions run in and are kept in (float32 or float64).
        skip_layers: module names or regular expressions (``re.fullmatch`` on the qualified
            name, or on the class name) of layers to leave to the plain gradient.
        grad_worker_fraction: fraction of ranks that precondition each layer (KAISA). ``1``:
            every rank (decompositions are broadcast, "COMM-OPT"); ``1/world_size``: only the
            owner (preconditioned gradients are broadcast, "MEM-OPT"); between: groups.
        assignment_cost: what the greedy owner assignment balances, ``"compute"`` (n^3 per
            factor) or ``"memory"`` (n^2 per factor).
        split_factors: let A and G of one layer have different owners (finer balance); only
            with ``grad_worker_fraction=1``.
        bucket_cap_mb: upper bound of one fused collective, in MiB.
        comm_dtype: dtype factors travel in (e.g. bfloat16); accumulation stays in
            ``factor_dtype``. ``None`` sends ``factor_dtype``.
        symmetric_comm: send symmetric factors as upper triangles (about half the bytes).
        overlap_factor_comm: launch each bucket's reduction from the backward hooks as soon as
            its layers' factors are complete, overlapping the rest of backward. A layer's calls
            per step are learnt from earlier steps; a step with more calls sends that bucket
            again in full (agreed by all ranks), so the factors are exact either way.
        cpu_threads: intra-op CPU threads for K-FAC's own work (factor products in the hooks,
            decompositions, preconditioning, KL clip). Float results of CPU eigh, Cholesky and
            matrix products depend on the thread count, which launchers set differently per node
            layout, so a fixed count gives the same results on one node or several. ``None``
            keeps torch's setting (faster on many-core CPUs). GPU work is not affected.
    """

    inverse_method: str = "cholesky"
    damping_mode: str = "factored"
    factor_dtype: torch.dtype = torch.float32
    inverse_dtype: torch.dtype = torch.float32
    skip_layers: tuple[str, ...] = field(default_factory=tuple)
    grad_worker_fraction: float = 1.0
    assignment_cost: str = "compute"
    split_factors: bool = False
    bucket_cap_mb: float = 25.0
    comm_dtype: torch.dtype | None = None
    symmetric_comm: bool = True
    overlap_factor_comm: bool = True
    cpu_threads: int | None = 1
    factor_samples: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "inverse_method", check_choice("inverse_method", self.inverse_method, INVERSE_METHODS))
        set_(self, "damping_mode", check_choice("damping_mode", self.damping_mode, DAMPING_MODES))
        if (self.inverse_method, self.damping_mode) not in BLOCK_CLASSES:
            raise ValueError(
                f"inverse_method={self.inverse_method!r} offers damping_mode='factored' only (its inverses "
                f"are of the damped factors); got damping_mode={self.damping_mode!r}. Use inverse_method='eigen' "
                "for exact damping of the Kronecker product"
            )
        if self.factor_samples is not None:
            set_(self, "factor_samples", check_positive_int("factor_samples", self.factor_samples))
        set_(self, "factor_dtype", check_float_dtype("factor_dtype", self.factor_dtype))
        set_(
            self,
            "inverse_dtype",
            check_float_dtype("inverse_dtype", self.inverse_dtype, (torch.float32, torch.float64)),
        )
        set_(self, "skip_layers", _check_patterns(self.skip_layers))
        set_(self, "grad_worker_fraction", check_fraction("grad_worker_fraction", self.grad_worker_fraction))
        set_(self, "assignment_cost", check_choice("assignment_cost", self.assignment_cost, ASSIGNMENT_COSTS))
        if not isinstance(self.split_factors, bool):
            raise TypeError(f"split_factors must be a bool, got {self.split_factors!r}")
        if self.split_factors and not self.block_class.sides_apart:
            raise ValueError(
                f"split_factors=True is only available with inverse_method='eigen' (inverse_method="
                f"{self.inverse_method!r} needs A and G on one rank: its damping uses both)"
            )
        if self.split_factors and self.grad_worker_fraction != 1.0:
            raise ValueError(
                "split_factors=True needs grad_worker_fraction=1 (every rank preconditions, so "
                f"both halves of a layer reach every rank); got grad_worker_fraction={self.grad_worker_fraction}"
            )
        set_(self, "bucket_cap_mb", check_positive_float("bucket_cap_mb", self.bucket_cap_mb))
        if self.comm_dtype is not None:
            set_(self, "comm_dtype", check_float_dtype("comm_dtype", self.comm_dtype))
        if self.cpu_threads is not None:
            set_(self, "cpu_threads", check_positive_int("cpu_threads", self.cpu_threads))
        for flag in ("symmetric_comm", "overlap_factor_comm"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def block_class(self) -> type[CurvatureBlock]:
        """The curvature block of :attr:`inverse_method` with :attr:`damping_mode`."""
        return BLOCK_CLASSES[(self.inverse_method, self.damping_mode)]

    @property
    def bucket_cap_bytes(self) -> int:
        return max(1, int(self.bucket_cap_mb * 1024 * 1024))

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(factor dtype, inverse dtype), in the order curvature blocks take them."""
        return self.factor_dtype, self.inverse_dtype

    def grad_workers_per_layer(self, world_size: int) -> int:
        """Number of ranks that precondition each layer; must divide ``world_size``. On one
        process every fraction means the same single worker."""
        if world_size == 1:
            return 1
        workers = self.grad_worker_fraction * world_size
        rounded = round(workers)
        if rounded < 1 or abs(workers - rounded) > 1e-6 or world_size % rounded != 0:
            allowed = ", ".join(f"{d}/{world_size}" for d in range(1, world_size + 1) if world_size % d == 0)
            raise ValueError(
                f"grad_worker_fraction={self.grad_worker_fraction} gives {workers:g} gradient workers per "
                f"layer on world_size={world_size}; it must give a whole number that divides the world "
                f"size. Allowed here: {allowed}"
            )
        return rounded


def _check_patterns(patterns: Any) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"skip_layers must be a list of module names or regular expressions, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"skip_layers entry {pattern!r} is not a valid regular expression: {err}") from None
    return tuple(patterns)
