"""Fused RMSNorm: ``rms_norm(x, weight, eps)`` = ``x / sqrt(mean(x^2, -1) + eps) * weight``, computed in fp32 and
returned in x's dtype (what Qwen2, vLLM and ``r1engine.models.policy.RMSNorm`` compute).

A ``torch.library`` operator (``r1engine.ops._library.custom_op``: fake kernel + autograd formula, so it works under
autograd and ``torch.compile(fullgraph=True)``, and eager calls do not import the compiler). The forward returns
``y`` and one fp32 ``rstd = 1 / sqrt(mean(x^2) + eps)`` per row; the backward saves only ``x``, ``rstd`` (and the
weight, a parameter) and recomputes the normalized rows:

    xhat = x * rstd,  gw = dy * weight
    dx = rstd * (gw - xhat * mean(gw * xhat, -1)),  dweight = sum over rows of dy * xhat  (fp32 accumulation)

where PyTorch's op-by-op graph keeps fp32 copies of ``x`` and of the normalized rows (for a bf16 ``x``: 4x the
bytes of ``x`` per norm). Backends: ``"cpp"`` (C++ CPU kernel ``torch.ops.r1engine.rms_norm_fwd/bwd``, fp32 and
bf16), ``"torch"`` (the same formulas in PyTorch, any device and float dtype), ``"auto"`` (``"cpp"`` for fp32/bf16
CPU tensors when the extension has the kernel, else ``"torch"``; CUDA tensors take ``"torch"`` for now).
``rms_norm_reference`` is the plain op-by-op oracle.
Eager calls that record no autograd graph (``torch.no_grad()``, inference, inputs that need no gradient) on
the ``"cpp"`` backend call the kernel directly, skipping the operator's Python layers (~10 us per call).
"""

from __future__ import annotations

import torch

from r1engine.ops._library import custom_op
from r1engine.ops.backends import cpu_kernel_op, resolve_cpu_kernel

__all__ = ["rms_norm", "rms_norm_reference", "BACKENDS"]

_BACKENDS = cpu_kernel_op("rms_norm", "rms_norm_fwd")
BACKENDS = _BACKENDS.names


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The op-by-op PyTorch RMSNorm (the oracle): ``(x.float() * rsqrt(mean(x^2) + eps) * weight.float())``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Operators. x is contiguous [..., H]; weight [H].


@custom_op("r1engine::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        return torch.ops.r1engine.rms_norm_fwd(x, weight.float().contiguous(), eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd.unsqueeze(-1) * weight.float()).to(x.dtype), rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _, backend = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward_op(grad_y.to(x.dtype).contiguous(), x, weight, rstd, ctx.backend)
    return dx, dweight, None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


@custom_op("r1engine::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        dx, dweight = torch.ops.r1engine.rms_norm_bwd(dy, x, weight.float().contiguous(), rstd)
    else:
        xhat = x.float() * rstd.unsqueeze(-1)
        g = dy.float()
        gw = g * weight.float()
        dx = (rstd.unsqueeze(-1) * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype)
        dweight = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx, dweight.to(weight.dtype)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, backend):
    return torch.empty_like(x), torch.empty_like(weight)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {what}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape [..., H] with H >= 1, got shape {list(x.shape)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        what = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight: expected a floating-point torch.Tensor, got {what}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight: expected shape [x.shape[-1]] = [{x.shape[-1]}], got {list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (as x), got {weight.device}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Differentiable RMSNorm over the last dim: ``x [..., H]`` (any float dtype on ``"torch"``, fp32/bf16 on
    ``"cpp"``; non-contiguous inputs are copied to contiguous), ``weight [H]``; returns ``[..., H]`` in x's dtype.
    Gradients reach ``x`` and ``weight`` (``dweight`` accumulated in fp32, returned in weight's dtype)."""
    _check(x, weight, eps)
    name = resolve_cpu_kernel(_BACKENDS, backend, x, "x")
    x = x.contiguous()
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if name == "cpp" and not grad and not torch.compiler.is_compiling():
        # nothing for autograd to record and not tracing: the kernel directly, without the operator's Python layers
        return torch.ops.r1engine.rms_norm_fwd(x, weight.float().contiguous(), float(eps))[0]
    y, _ = _rms_norm_op(x, weight, float(eps), name)
    return y
