"""Fused SwiGLU: ``swiglu(gate, up)`` = ``silu(gate) * up`` (the product a SwiGLU MLP feeds to ``down_proj``).

A ``torch.library`` operator (``r1engine.ops._library.custom_op``: fake kernel + autograd formula, so it works under
autograd and ``torch.compile(fullgraph=True)``, and eager calls do not import the compiler). The backward saves only
``gate`` and ``up`` and recomputes ``s = sigmoid(gate)`` (Liger-Kernel's ``LigerSiLUMulFunction`` idea):

    dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s

where PyTorch's op-by-op graph also keeps ``silu(gate)``, a third tensor of the MLP's width. The C++ kernel
computes in fp32 and rounds once to the inputs' dtype (the op-by-op bf16 graph rounds ``silu(gate)`` to bf16
before the product). Backends: ``"cpp"`` (C++ CPU kernel ``torch.ops.r1engine.swiglu_fwd/bwd``, fp32 and bf16),
``"torch"`` (the same formulas in PyTorch, any device and float dtype), ``"auto"`` (``"cpp"`` for fp32/bf16 CPU
tensors when the extension has the kernel, else ``"torch"``; CUDA tensors take ``"torch"`` for now).
``swiglu_reference`` is the plain op-by-op oracle.
Eager calls that record no autograd graph (``torch.no_grad()``, inference, inputs that need no gradient) on
the ``"cpp"`` backend call the kernel directly, skipping the operator's Python layers (~10 us per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1engine.ops._library import custom_op
from r1engine.ops.backends import cpu_kernel_op, resolve_cpu_kernel

__all__ = ["swiglu", "swiglu_reference", "BACKENDS"]

_BACKENDS = cpu_kernel_op("swiglu", "swiglu_fwd")
BACKENDS = _BACKENDS.names


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The op-by-op PyTorch SwiGLU (the oracle): ``F.silu(gate) * up``."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------------
# Operators. gate and up are contiguous, of equal shape and dtype.


@custom_op("r1engine::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cpp":
        return torch.ops.r1engine.swiglu_fwd(gate, up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@_swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate)


def _swiglu_setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _swiglu_backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward_op(grad_y.to(gate.dtype).contiguous(), gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


@custom_op("r1engine::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        return torch.ops.r1engine.swiglu_bwd(dy, gate, up)
    g, u, d = gate.float(), up.float(), dy.float()
    # silu_backward(a, g) = a * s * (1 + g * (1 - s)), one pass
    dgate = torch.ops.aten.silu_backward(d * u, g)
    dup = d * F.silu(g)
    return dgate.to(gate.dtype), dup.to(up.dtype)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, backend):
    return torch.empty_like(gate), torch.empty_like(up)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {what}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected shape {list(gate.shape)} (as gate), got {list(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected dtype {gate.dtype} (as gate), got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up: expected device {gate.device} (as gate), got {up.device}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``silu(gate) * up`` for ``gate`` and ``up`` of equal shape and dtype (fp32/bf16 on ``"cpp"``,
    any float dtype on ``"torch"``; non-contiguous inputs are copied to contiguous); result in their dtype."""
    _check(gate, up)
    name = resolve_cpu_kernel(_BACKENDS, backend, gate, "gate")
    gate, up = gate.contiguous(), up.contiguous()
    grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if name == "cpp" and not grad and not torch.compiler.is_compiling():
        # nothing for autograd to record and not tracing: the kernel directly, without the operator's Python layers
        return torch.ops.r1engine.swiglu_fwd(gate, up)
    return _swiglu_op(gate, up, name)
