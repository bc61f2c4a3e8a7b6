"""Independent K-FAC math for tests and benchmarks: factors computed from a layer's inputs and
output gradients by hand, damped Kronecker solves with ``torch.kron``, per-position conv loops.

Nothing here calls the engine, so a check against these functions can catch the engine's
mistakes. The definitions are those of ``docs/conventions.md``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DAMPING_MODES = ("exact", "factored")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (a zero ``expected`` counts as norm 1e-300)."""
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def capture_output_grads(module: nn.Module) -> list[Tensor]:
    """Registers hooks that append a copy of every output gradient ``dL/dy`` of ``module``."""
    grads: list[Tensor] = []

    def forward_hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda g: grads.append(g.detach().clone()))

    module.register_forward_hook(forward_hook)
    return grads


def linear_factors(x: Tensor, output_grad: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """A and G of a Linear layer from its input ``x`` (B, ..., in) and output gradient
    ``dL/dy`` (B, ..., out): ``A = mean over rows of a a^T`` (a = [x; 1] with a bias) and
    ``G = B sum over rows of gy gy^T`` (B the leading dimension)."""
    batch = x.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    gy = output_grad.reshape(-1, output_grad.shape[-1])
    return rows.T @ rows / rows.shape[0], batch * gy.T @ gy


def tikhonov_shares(a: Tensor, g: Tensor, damping: float) -> tuple[float, float]:
    """(gamma_A, gamma_G) = (pi sqrt(lambda), sqrt(lambda) / pi) with
    pi = sqrt((tr A / dim A) / (tr G / dim G)); ``a`` may be a diagonal given as a vector."""
    mean_a = float(a.sum() / a.numel()) if a.dim() == 1 else float(torch.trace(a) / a.shape[0])
    pi = math.sqrt(mean_a / float(torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_kronecker_solve(a: Tensor, g: Tensor, v: Tensor, damping: float, mode: str) -> Tensor:
    """The preconditioned gradient V' of a layer gradient V (out, in[+1]) as one explicit solve:

    * ``"exact"``:    (G (x) A + lambda I) vec(V') = vec(V)
    * ``"factored"``: ((G + gamma_G I) (x) (A + gamma_A I)) vec(V') = vec(V)

    with vec row-major over V. ``a`` may be a diagonal given as a vector (Embedding)."""
    if mode not in DAMPING_MODES:
        raise ValueError(f"mode must be one of {DAMPING_MODES}, got {mode!r}")
    big_a = torch.diag(a) if a.dim() == 1 else a
    identity_a = torch.eye(big_a.shape[0], dtype=big_a.dtype)
    identity_g = torch.eye(g.shape[0], dtype=g.dtype)
    if mode == "exact":
        system = torch.kron(g, big_a) + damping * torch.kron(identity_g, identity_a)
    else:
        gamma_a, gamma_g = tikhonov_shares(a, g, damping)
        system = torch.kron(g + gamma_g * identity_g, big_a + gamma_a * identity_a)
    return torch.linalg.solve(system, v.reshape(-1)).reshape(v.shape)


def conv2d_factors_by_positions(conv: nn.Conv2d, x: Tensor, output_grad: Tensor) -> tuple[Tensor, Tensor]:
    """A and G of a Conv2d from an explicit loop over output positions (no unfold): A is the mean
    over all B x L patch rows (with a ones entry for the bias), G is B times the sum over rows."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = cast(tuple[int, int], conv.padding)  # explicit padding (no "same"/"valid" here)
    dh, dw = conv.dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    batch, _, out_h, out_w = output_grad.shape
    rows_a, rows_g = [], []
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                patch = padded[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                a = patch.reshape(-1)
                if conv.bias is not None:
                    a = torch.cat([a, a.new_ones(1)])
                rows_a.append(a)
                rows_g.append(output_grad[b, :, i, j])
    a_rows, g_rows = torch.stack(rows_a), torch.stack(rows_g)
    return a_rows.T @ a_rows / a_rows.shape[0], batch * g_rows.T @ g_rows
