"""Hooks and per-step accumulators: what each layer's forward and backward hand to K-FAC.

A forward hook on every registered layer adds ``sum_r a_r a_r^T`` of the layer input to the
layer's :class:`LayerRecord` and puts a hook on the output, which adds ``B sum_r gy_r gy_r^T`` of
the output gradient when backward reaches it (``docs/conventions.md``). Sums are kept in
float32 or wider (products of loss-scaled gradients overflow float16), together with the row
counts and the number of backward passes that reached the layer, so that a factor update can
average exactly the rows and passes that exist.

Nothing is recorded unless :attr:`Recorder.recording` is on, the module is in training mode,
autograd is enabled, the layer's weight trains, and the schedule has the layer due.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from lightning_kfac.engine.curvature import intra_op_threads
from lightning_kfac.engine.factors import FactorLayout
from lightning_kfac.engine.layers import KFACLayer


@dataclass
class LayerRecord:
    """One layer's statistics since the last factor update."""

    a_sum: Tensor | None = None
    a_rows: int = 0
    g_sum: Tensor | None = None
    g_rows: int = 0
    g_calls: int = 0
    g_passes: int = 0  # backward passes that reached the layer
    last_pass: int = -1

    def clear(self) -> None:
        self.a_sum = self.g_sum = None
        self.a_rows = self.g_rows = self.g_calls = self.g_passes = 0
        self.last_pass = -1

    @property
    def counts(self) -> tuple[int, int, int]:
        """(A rows, G rows, backward passes): what a factor bucket compares to find late calls."""
        return self.a_rows, self.g_rows, self.g_passes

    @property
    def empty(self) -> bool:
        return not (self.a_rows or self.g_calls or self.a_sum is not None or self.g_sum is not None)


class Recorder:
    """Installs the hooks on ``layers`` and keeps one :class:`LayerRecord` per layer.

    Args:
        layers: the registered layers by name.
        accumulate_dtype: dtype of the sums.
        cpu_threads: intra-op threads for the factor products (see ``KFACConfig.cpu_threads``).
        is_due: whether a layer's factors are updated at the current step.
        on_first_record: called by the first recording forward of a step.
        on_output_grad: called after each output gradient is recorded (buckets may launch).
        factor_samples: at most this many samples of each call's batch enter the statistics
            (see ``KFACConfig.factor_samples``); None: all.
        sample_seed: seeds the draws (with the step), e.g. the rank, so ranks draw differently.
    """

    def __init__(
        self,
        layers: dict[str, KFACLayer],
        accumulate_dtype: torch.dtype,
        cpu_threads: int | None,
        is_due: Callable[[str], bool],
        on_first_record: Callable[[], None],
        on_output_grad: Callable[[], None],
        factor_samples: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        self.layers = layers
        self.records = {name: LayerRecord() for name in layers}
        self.accumulate_dtype = accumulate_dtype
        self.cpu_threads = cpu_threads
        #: when False the hooks record nothing (evaluation loops, sanity checks)
        self.recording = True
        self._is_due = is_due
        self._on_first_record = on_first_record
        self._on_output_grad = on_output_grad
        self.factor_samples = factor_samples
        self.sample_seed = sample_seed
        #: the engine's step counter (seeds this step's sample draw)
        self.step = 0
        self._subsets: dict[tuple[int, str], Tensor] = {}
        #: host seconds spent in the hooks since the last step (the factor statistics)
        self.hook_seconds = 0.0
        self._started = False
        # backward passes seen; a pass ends in a callback autograd runs when it finishes
        self._passes = 0
        self._in_backward = False
        #: False when autograd cannot queue the end-of-pass callback: every pass counts as
        #: ``accumulation_steps`` (the caller's fall-back)
        self.pass_tracking = True
        #: k when each loss was divided by k accumulated micro-batches (Lightning); see :meth:`factor`
        self.accumulation_steps = 1
        #: per layer, (A, G) rows per rank that wire values are divided by, agreed by every rank
        self.row_scales: dict[str, tuple[float, float]] = {}
        # most output-gradient calls a layer had in one step: its bucket may go once reached
        self.expected_calls: dict[str, int] = {}
        self._handles = [layer.module.register_forward_hook(self._forward_hook(name)) for name, layer in layers.items()]

    def _forward_hook(self, name: str) -> Callable:
        # the model's hook table must not keep a discarded recorder (or preconditioner) alive
        owner = weakref.ref(self)

        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            recorder = owner()
            if recorder is not None:
                recorder._record_input(name, module, inputs, output)

        return forward_hook

    def _recording_now(self, name: str, module: nn.Module) -> bool:
        return (
            self.recording
            and module.training
            and torch.is_grad_enabled()
            and self.layers[name].trains
            and self._is_due(name)
        )

    def _record_input(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not inputs or not isinstance(output, Tensor) or not isinstance(inputs[0], Tensor):
            return
        if not self._recording_now(name, module):
            return
        if not self._started:
            self._started = True
            self._on_first_record()
        start = time.perf_counter()
        try:
            self._record_rows(name, inputs[0], output)
        finally:
            self.hook_seconds += time.perf_counter() - start

    def _record_rows(self, name: str, x: Tensor, output: Tensor) -> None:
        layer, record = self.layers[name], self.records[name]
        batch = layer.batch_size(x)
        subset = self._subset(batch, x) if x.dim() > 1 else None
        if subset is not None:  # a random subsample: G is scaled by B / b once more (unbiased)
            x, weight = x.index_select(0, subset), batch * batch / subset.numel()
        else:
            weight = float(batch)
        with torch.no_grad(), _autocast_off(x), intra_op_threads(self.cpu_threads):
            a, rows = layer.a_statistics(x.detach(), self.accumulate_dtype)
            record.a_sum = a if record.a_sum is None else record.a_sum.add_(a)
            record.a_rows += rows
        if output.requires_grad:
            mask = layer.output_row_mask(x)
            owner = weakref.ref(self)

            def output_grad_hook(grad: Tensor) -> None:
                recorder = owner()
                if recorder is not None:
                    rows_of = grad if subset is None else grad.index_select(0, subset)
                    recorder._record_output_grad(name, weight, mask, rows_of)

            output.register_hook(output_grad_hook)

    def _subset(self, batch: int, x: Tensor) -> Tensor | None:
        """This step's sample draw for batches of ``batch`` on ``x``'s device (None: use all)."""
        if self.factor_samples is None or batch <= self.factor_samples:
            return None
        key = (batch, str(x.device))
        if key not in self._subsets:
            seed = (self.sample_seed * 1_000_003 + self.step) % 2**31  # per rank and step, reproducible
            generator = torch.Generator(device=x.device).manual_seed(seed)
            self._subsets[key] = torch.randperm(batch, generator=generator, device=x.device)[: self.factor_samples]
        return self._subsets[key]

    def _record_output_grad(self, name: str, weight: float, mask: Tensor | None, grad: Tensor) -> None:
        start = time.perf_counter()
        self._enter_backward_pass()
        record = self.records[name]
        with torch.no_grad(), _autocast_off(grad), intra_op_threads(self.cpu_threads):
            rows = self.layers[name].output_grad_rows(grad.detach()).to(self.accumulate_dtype)
            if mask is not None:
                rows = rows[mask]
            g = torch.mm(rows.T, rows).mul_(weight)
            record.g_sum = g if record.g_sum is None else record.g_sum.add_(g)
            record.g_rows += rows.shape[0]
            record.g_calls += 1
            if record.last_pass != self._passes:
                record.last_pass = self._passes
                record.g_passes += 1
        self.hook_seconds += time.perf_counter() - start
        self._on_output_grad()

    def _enter_backward_pass(self) -> None:
        """The first output-gradient hook of a backward pass starts it; a callback autograd runs
        when the pass finishes closes it (the mechanism DDP uses for its own end of backward)."""
        if self._in_backward or not self.pass_tracking:
            return
        self._in_backward = True
        self._passes += 1
        owner = weakref.ref(self)

        def end_of_pass() -> None:
            recorder = owner()
            if recorder is not None:
                recorder._in_backward = False

        try:
            Variable._execution_engine.queue_callback(end_of_pass)
        except RuntimeError:  # not inside an autograd pass
            self._in_backward = False
            self.pass_tracking = False

    # --- the step's factors, as the exchange reads them (FactorSource) --------------------------
    def factor(self, name: str, side: str) -> tuple[Tensor, float, int]:
        """(sum, scale making it this rank's mean, rows). A: the mean over rows. G: the mean
        over the backward passes that reached the layer, each loss having been divided by the
        accumulation count k, so the scale is k^2 / passes (``docs/conventions.md``)."""
        record, layer = self.records[name], self.layers[name]
        if side == "a":
            total, rows = record.a_sum, record.a_rows
            scale = 1.0 / rows if rows else 0.0
        else:
            total, rows = record.g_sum, record.g_rows
            passes = record.g_passes if self.pass_tracking else self.accumulation_steps
            scale = self.accumulation_steps**2 / max(1, passes)
        if total is None:
            layout = layer.a_layout if side == "a" else layer.g_layout
            total = torch.zeros(layout.shape, dtype=self.accumulate_dtype, device=layer.weight.device)
        return total, scale, rows

    def counts(self, name: str) -> tuple[int, int, int]:
        return self.records[name].counts

    def complete(self, name: str) -> bool:
        """All of this step's calls of the layer delivered their output gradient, as far as past
        steps tell; a later call makes its bucket late (sent again at the step)."""
        expected, record = self.expected_calls.get(name), self.records[name]
        return expected is not None and record.a_rows > 0 and record.g_calls >= expected

    def layout(self, name: str, side: str) -> FactorLayout:
        layer = self.layers[name]
        return layer.a_layout if side == "a" else layer.g_layout

    def row_scale(self, name: str, side: str) -> float:
        return self.row_scales.get(name, (1.0, 1.0))[0 if side == "a" else 1]

    def learn_expected_calls(self) -> None:
        for name, record in self.records.items():
            if record.g_calls:
                self.expected_calls[name] = max(self.expected_calls.get(name, 0), record.g_calls)

    def end_step(self) -> None:
        """After the step's factor update (or when it is dropped): fresh accumulators."""
        for record in self.records.values():
            record.clear()
        self._started = False
        self._in_backward = False
        self._subsets.clear()
        self.hook_seconds = 0.0

    def anything_recorded(self) -> bool:
        return any(not record.empty for record in self.records.values())

    def remove(self) -> None:
        """Remove every hook and drop what was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_step()


def _autocast_off(tensor: Tensor) -> Any:
    device_type = tensor.device.type
    if device_type in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()
