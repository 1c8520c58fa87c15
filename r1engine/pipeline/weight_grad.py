"""Deferred weight gradients for zero-bubble schedules: `WeightGradStore` and a deferrable Linear.

A zero-bubble schedule splits a layer's backward into B (gradient w.r.t. the input, needed at once by the
previous stage) and W (gradient w.r.t. the weights, which nobody waits for). Inside
`WeightGradStore.deferring()` the backward of `DeferrableLinear` returns only the input gradient and queues a
closure computing the weight (and bias) gradient; the executor runs the queued closures when the schedule
reaches the W of that chunk. Outside the context it behaves as `nn.Linear` (same forward kernel), so the same
module serves as the unpartitioned reference. Other layers' parameters simply get their gradients in B.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """Collects weight-gradient closures while a deferring backward runs (one store per process)."""

    _queue: list[Callable[[], None]] | None = None

    @classmethod
    def enabled(cls) -> bool:
        """True inside `deferring()`."""
        return cls._queue is not None

    @classmethod
    def put(cls, fn: Callable[[], None]) -> None:
        """Queue a weight-gradient computation (called from autograd backward functions)."""
        if cls._queue is None:
            raise RuntimeError("WeightGradStore.put called outside WeightGradStore.deferring()")
        cls._queue.append(fn)

    @classmethod
    @contextlib.contextmanager
    def deferring(cls) -> Iterator[list[Callable[[], None]]]:
        """Within the block, deferrable layers queue their weight gradients into the yielded list."""
        if cls._queue is not None:
            raise RuntimeError("WeightGradStore.deferring() is not reentrant")
        queue: list[Callable[[], None]] = []
        cls._queue = queue
        try:
            yield queue
        finally:
            cls._queue = None


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_param = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        want_w = ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if WeightGradStore.enabled():
            bias = ctx.bias_param if want_b else None

            def weight_grad() -> None:
                if want_w:
                    _accumulate(weight, g2.t().matmul(x2))
                if bias is not None:
                    _accumulate(bias, g2.sum(0))

            WeightGradStore.put(weight_grad)
            return grad_x, None, None
        grad_w = g2.t().matmul(x2) if want_w else None
        grad_b = g2.sum(0) if want_b else None
        return grad_x, grad_w, grad_b


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose weight/bias gradients are deferred to `WeightGradStore` inside `deferring()`."""
    return _DeferrableLinearFn.apply(x, weight, bias)


class DeferrableLinear(nn.Linear):
    """nn.Linear whose weight gradient can be deferred (B now, W later) by a zero-bubble schedule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deferrable_linear(x, self.weight, self.bias)
