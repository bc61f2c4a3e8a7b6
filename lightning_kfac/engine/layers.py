"""Per-layer-kind factor math: what a layer contributes to A and G, and how its gradient is read
and written as one matrix V of shape (out, in [+1]).

The scaling follows ``shared/CONVENTIONS.md``: with B the leading (batch) dimension of the
layer's input and R the number of rows (samples x positions),

    A = (1/R) sum_r a_r a_r^T                      (mean over every row)
    G = B * sum_r gy_r gy_r^T,  gy = dL/dy         (= (1/B) sum_r g_r g_r^T, g = B dL/dy)

For plain (B, in) inputs this is the per-sample empirical Fisher. For sequences and conv
feature maps (R = B x positions), A is the mean over positions and G the per-sample sum over
positions: Kronecker-factored "expand" (Grosse & Martens 2016, KFC) scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KFACLayer:
    """A supported module: turns its input and output gradient into factor rows and exposes its
    gradient as one matrix."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def a_dim(self) -> int:
        return self.weight[0].numel() + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.weight.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params  # type: ignore[return-value]

    # --- factor rows -----------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows a_r of shape (R, a_dim), a column of ones appended when there is a bias."""
        raise NotImplementedError

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        """Rows gy_r of shape (R, g_dim)."""
        raise NotImplementedError

    @staticmethod
    def batch_size(x: Tensor) -> int:
        return x.shape[0] if x.dim() > 1 else 1

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    # --- gradient as a matrix --------------------------------------------------------------
    def grad_matrix(self) -> Tensor | None:
        """V = [dL/dW, dL/db] of shape (g_dim, a_dim), or None when there is no gradient."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        matrix = weight_grad.reshape(self.g_dim, -1)
        if self.has_bias:
            bias_grad = self.module.bias.grad  # type: ignore[union-attr]
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)  # type: ignore[arg-type]
            matrix = torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)
        return matrix

    def write_grad(self, matrix: Tensor) -> None:
        weight = self.weight
        n_weight = weight[0].numel()
        weight.grad.copy_(matrix[:, :n_weight].reshape_as(weight))  # type: ignore[union-attr]
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:  # type: ignore[union-attr]
                bias.grad = torch.zeros_like(bias)  # type: ignore[union-attr]
            bias.grad.copy_(matrix[:, n_weight])  # type: ignore[union-attr]


class LinearLayer(KFACLayer):
    kind = "Linear"

    def input_rows(self, x: Tensor) -> Tensor:
        return self._append_ones(x.reshape(-1, x.shape[-1]))

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])


class Conv2dLayer(KFACLayer):
    """Conv2d with groups=1: a_r are the im2col patches of every output position."""

    kind = "Conv2d"

    def input_rows(self, x: Tensor) -> Tensor:
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):
            x, padding = _explicit_same_padding(x, conv)
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._append_ones(rows)

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        if gy.dim() == 3:
            gy = gy.unsqueeze(0)
        return gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])

    @staticmethod
    def batch_size(x: Tensor) -> int:
        return x.shape[0] if x.dim() == 4 else 1


def _explicit_same_padding(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, tuple[int, int]]:
    if conv.padding == "valid":
        return x, (0, 0)
    # padding="same" (stride 1): the total padding per dim is dilation*(k-1), extra on the right.
    pads: list[int] = []
    for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0, 0)


def make_layer(name: str, module: nn.Module) -> tuple[KFACLayer | None, str | None]:
    """The handler for a module, or None and the reason it stays first-order."""
    if isinstance(module, nn.Linear):
        if not module.weight.requires_grad:
            return None, "frozen (weight.requires_grad=False)"
        return LinearLayer(name, module), None
    if isinstance(module, nn.Conv2d):
        if not module.weight.requires_grad:
            return None, "frozen (weight.requires_grad=False)"
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} is not supported (groups=1 only)"
        return Conv2dLayer(name, module), None
    return None, None
