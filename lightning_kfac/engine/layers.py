"""Per-layer-kind factor math: what a layer contributes to A and G, and how its gradient is read
and written as one matrix V of shape (out, in [+1]).

The scaling follows ``docs/conventions.md``: with B the leading (batch) dimension of the
layer's input and R the number of rows (samples x positions),

    A = (1/R) sum_r a_r a_r^T                      (mean over every row)
    G = B * sum_r gy_r gy_r^T,  gy = dL/dy         (= (1/B) sum_r g_r g_r^T, g = B dL/dy)

For plain (B, in) inputs this is the per-sample empirical Fisher. For sequences and conv
feature maps (R = B x positions), A is the mean over positions and G the per-sample sum over
positions: Kronecker-factored "expand" (Grosse & Martens 2016, KFC) scaling.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.engine.factors import FactorLayout


class KFACLayer:
    """A supported module: turns its input and output gradient into factor statistics and
    exposes its gradient as one matrix V of shape (g_dim, a_dim)."""

    kind = "Layer"
    #: A is diagonal (stored, communicated and inverted as a vector of a_dim values)
    a_diagonal = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.a_layout.shape

    @property
    def a_layout(self) -> FactorLayout:
        """A as recorded, stored and sent (with the bias column whenever the module has a bias)."""
        return FactorLayout("A", self.a_dim, self.a_diagonal)

    @property
    def g_layout(self) -> FactorLayout:
        return FactorLayout("G", self.g_dim)

    @property
    def trains(self) -> bool:
        """The weight trains now: the layer records factors and is preconditioned. (A layer
        whose weight is frozen keeps its factors and waits; a frozen bias alone is handled by
        :attr:`bias_trains`.)"""
        return bool(self.weight.requires_grad)

    @property
    def bias_trains(self) -> bool:
        """The module has a bias and it trains: V and the decomposition of A include the bias
        column. A frozen bias leaves a weight-only K-FAC layer: A without its last row and
        column, V = dL/dW, and nothing written into the bias's gradient."""
        return self.bias is not None and bool(self.bias.requires_grad)

    @property
    def active_a_layout(self) -> FactorLayout:
        """The part of A that is decomposed and multiplies V: all of it, or the weight block."""
        return FactorLayout("A", self.a_dim - int(self.has_bias and not self.bias_trains), self.a_diagonal)

    def active_a(self, a: Tensor) -> Tensor:
        """``a`` restricted to :attr:`active_a_layout` (a view)."""
        n = self.active_a_layout.dim
        return a if n == self.a_dim else a[:n, :n]

    def a_statistics(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """(sum over rows of a_r a_r^T, number of rows) for one call."""
        rows = self.weight_rows(x).to(dtype)
        count, width = rows.shape
        if not self.has_bias:
            return rows.T @ rows, count
        if count <= width:  # few rows (a Linear batch): appending the ones column is cheaper
            rows = self._append_ones(rows)
            return rows.T @ rows, count
        # many rows (conv positions): [[P^T P, P^T 1], [1^T P, R]] without copying P once more
        a = rows.new_empty(width + 1, width + 1)
        a[:width, :width] = rows.T @ rows
        column_sums = rows.sum(dim=0)
        a[:width, width] = column_sums
        a[width, :width] = column_sums
        a[width, width] = count
        return a, count

    def output_row_mask(self, x: Tensor) -> Tensor | None:
        """Rows of the output gradient that count for G (None: all)."""
        return None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def weight(self) -> Tensor:
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def bias(self) -> Tensor | None:
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def a_dim(self) -> int:
        return self.weight[0].numel() + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.weight.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters K-FAC writes gradients into now (a frozen bias is not one)."""
        params = [self.weight]
        if self.bias_trains and self.bias is not None:
            params.append(self.bias)
        return cast(list[nn.Parameter], params)

    # --- factor rows -----------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows a_r of shape (R, a_dim), a column of ones appended when there is a bias."""
        return self._append_ones(self.weight_rows(x))

    def weight_rows(self, x: Tensor) -> Tensor:
        """Rows of shape (R, a_dim - has_bias): the inputs the weight multiplies."""
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
        bias = self.bias
        if self.bias_trains and bias is not None:
            bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            matrix = torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)
        return matrix

    def write_grad(self, matrix: Tensor, scale: Tensor | None = None) -> None:
        """Writes ``scale * matrix`` (``scale``: a 0-dim tensor or None) into the parameters'
        gradients: one pass, the scaling fused into the copy."""
        weight, bias = self.weight, self.bias
        n_weight = weight[0].numel()
        assert weight.grad is not None, "write_grad needs the weight's gradient"
        _write_scaled(weight.grad, matrix[:, :n_weight], scale, (self.g_dim, n_weight))
        if self.bias_trains and bias is not None:
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            _write_scaled(bias.grad, matrix[:, n_weight], scale, (self.g_dim,))


def _write_scaled(target: Tensor, source: Tensor, scale: Tensor | None, shape: tuple[int, ...]) -> None:
    """target[...] = scale * source, with ``source`` seen in ``shape``; no temporary when the
    target is contiguous (reshape of a column slice would copy, then copy again)."""
    if target.is_contiguous():
        view = target.view(shape)
        if scale is None:
            view.copy_(source)
        else:
            torch.mul(source, scale, out=view)
        return
    value = source if scale is None else source * scale
    target.copy_(value.reshape(target.shape))


class LinearLayer(KFACLayer):
    kind = "Linear"

    def weight_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])


class ConvLayer(KFACLayer):
    """Conv1d/2d/3d with groups=1: a_r are the patches (C x kernel) of every output position."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.conv = cast(nn.modules.conv._ConvNd, module)
        self.kind = type(module).__name__
        self.spatial = len(self.conv.kernel_size)

    def _padded(self, x: Tensor) -> Tensor:
        conv = self.conv
        if x.dim() == self.spatial + 1:  # unbatched
            x = x.unsqueeze(0)
        if conv.padding_mode != "zeros":
            return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        if conv.padding == "valid":
            return x
        if conv.padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads)
        padding = cast(tuple[int, ...], conv.padding)  # not a string: handled above
        if any(padding):
            return F.pad(x, [p for p in reversed(padding) for _ in range(2)])
        return x

    def weight_rows(self, x: Tensor) -> Tensor:
        conv = self.conv
        if self.spatial == 2 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and x.dim() == 4:
            # unfold pads by itself: one copy of the input fewer than F.pad + unfold
            patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        x = self._padded(x)
        if self.spatial == 2:
            patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            # (B, C, *S) -> (B, C, *O, *K) with one unfold per spatial dim; dilation by slicing
            for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)):
                x = x.unfold(2 + i, d * (k - 1) + 1, s)
                if d > 1:
                    x = x[..., ::d]
            n = self.spatial
            order = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
            x = x.permute(order)
            rows = x.reshape(-1, x.shape[1 + n :].numel())
        return rows

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        if gy.dim() == self.spatial + 1:
            gy = gy.unsqueeze(0)
        return gy.movedim(1, -1).reshape(-1, gy.shape[1])

    def batch_size(self, x: Tensor) -> int:  # type: ignore[override]
        return x.shape[0] if x.dim() == self.spatial + 2 else 1


class EmbeddingLayer(KFACLayer):
    """nn.Embedding: y = E[token]. The input is one-hot, so A = diag(token frequencies) is kept
    as a vector and never as a vocab x vocab matrix; G as for Linear. V = dL/dE^T of shape
    (embedding_dim, num_embeddings). Positions holding ``padding_idx`` (whose row receives no
    gradient) count for neither factor."""

    kind = "Embedding"
    a_diagonal = True

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.embedding = cast(nn.Embedding, module)

    @property
    def a_dim(self) -> int:
        return self.embedding.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def has_bias(self) -> bool:
        return False

    def a_statistics(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        tokens = x.reshape(-1)
        padding_idx = self.embedding.padding_idx
        if padding_idx is not None:
            tokens = tokens[tokens != padding_idx]
        counts = torch.bincount(tokens, minlength=self.a_dim).to(dtype)
        return counts, tokens.numel()

    def output_row_mask(self, x: Tensor) -> Tensor | None:
        padding_idx = self.embedding.padding_idx
        return None if padding_idx is None else x.reshape(-1) != padding_idx

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])

    def grad_matrix(self) -> Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad.T

    def write_grad(self, matrix: Tensor, scale: Tensor | None = None) -> None:
        grad = self.weight.grad
        assert grad is not None, "write_grad needs the weight's gradient"
        _write_scaled(grad, matrix.T, scale, tuple(grad.shape))


def make_layer(name: str, module: nn.Module) -> tuple[KFACLayer | None, str | None]:
    """The handler for a module, or None and the reason it stays first-order (None, None for
    modules that hold no weights K-FAC would consider). Frozen layers are handled too: they
    record and are preconditioned from the first step on which their weight trains."""
    if isinstance(module, nn.Linear):
        return LinearLayer(name, module), None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return None, f"{type(module).__name__} with groups={module.groups}: only groups=1 is preconditioned"
        return ConvLayer(name, module), None
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "Embedding(sparse=True): sparse gradients are not preconditioned"
        return EmbeddingLayer(name, module), None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None, f"{type(module).__name__} is not supported"
    return None, None


@dataclass(frozen=True)
class SkippedLayer:
    """A module K-FAC leaves to its plain gradient, and why."""

    name: str
    kind: str
    reason: str


def register_layers(model: nn.Module, skip_layers: tuple[str, ...]) -> tuple[dict[str, KFACLayer], list[SkippedLayer]]:
    """The supported layers of ``model`` by qualified name (each module once, frozen or not),
    and the modules left out with the reason: ``skip_layers`` patterns (``re.fullmatch`` on the
    name or the class name) or an unsupported configuration. Warns about patterns that match
    nothing and about a model with no supported layer."""
    patterns = [re.compile(p) for p in skip_layers]
    matched = [False] * len(patterns)
    # MultiheadAttention passes out_proj's weight to a function: its hooks never fire
    functional = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers: dict[str, KFACLayer] = {}
    skipped: list[SkippedLayer] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        layer, reason = make_layer(name, module)
        if id(module) in functional:
            layer, reason = None, "MultiheadAttention's out_proj, called functionally by the attention"
        if layer is None and reason is None:
            continue
        hits = [i for i, p in enumerate(patterns) if p.fullmatch(name) or p.fullmatch(type(module).__name__)]
        for i in hits:
            matched[i] = True
        if hits or layer is None:
            skipped.append(SkippedLayer(name, type(module).__name__, "matched skip_layers" if hits else reason or ""))
            continue
        layers[name] = layer
    for pattern, hit in zip(skip_layers, matched, strict=True):
        if not hit:
            warnings.warn(f"skip_layers pattern {pattern!r} matched no supported layer", stacklevel=4)
    if not layers:
        warnings.warn(
            f"{type(model).__name__} has no layer K-FAC can precondition (nn.Linear, nn.Conv1d/2d/3d, "
            "nn.Embedding); gradients pass through unchanged",
            stacklevel=4,
        )
    return layers, skipped
