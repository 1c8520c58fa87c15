"""Fused rotary position embedding: ``rope(x, cos, sin)`` rotates ``x [..., T, H, D]`` by ``cos/sin [..., T, D]`` in the
NeoX half-rotation layout (Qwen2, Llama), ``y = x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat([-x[..., D/2:], x[..., :D/2]])``, computed in fp32 and returned in x's dtype.

A ``torch.library`` operator (``r1engine.ops._library.custom_op``: fake kernel + autograd formula, so it works under
autograd and ``torch.compile(fullgraph=True)``, and eager calls do not import the compiler). The map is linear in
``x``, so the backward keeps only ``cos`` and ``sin`` (shared by every layer of a forward) and applies the
transpose:

    dx = g * cos + rotate_half^T(g * sin),  rotate_half^T(y) = cat([y[..., D/2:], -y[..., :D/2]])

``cos`` and ``sin`` get no gradient: passing ones that require grad (with grad mode on) raises; use
``rope_reference`` to differentiate through them. The C++ kernel reads ``x`` once and writes ``y`` once (the op-by-op
graph makes the rotated copy, its fp32 copies, two products and their sum); it rounds like the op-by-op graph
(separate products and sum, no FMA), so fp32 results equal ``rope_reference`` bit for bit. Backends: ``"cpp"``
(``torch.ops.r1engine.rope_fwd/bwd``, fp32 and bf16 ``x``), ``"torch"`` (the same formulas in PyTorch, any device
and float dtype), ``"auto"`` (``"cpp"`` for fp32/bf16 CPU tensors when the extension has the kernel, else ``"torch"``;
CUDA tensors take ``"torch"`` for now).
Eager calls that record no autograd graph (``torch.no_grad()``, inference, inputs that need no gradient) on
the ``"cpp"`` backend call the kernel directly, skipping the operator's Python layers (~10 us per call).
"""

from __future__ import annotations

import torch

from r1engine.ops._library import custom_op
from r1engine.ops.backends import cpu_kernel_op, resolve_cpu_kernel

__all__ = ["rope", "rope_reference", "BACKENDS"]

_BACKENDS = cpu_kernel_op("rope", "rope_fwd")
BACKENDS = _BACKENDS.names


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The op-by-op PyTorch rotation (the oracle): ``x [..., T, H, D]`` by ``cos/sin [..., T, D]``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x.float() * c + rot.float() * s).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Operators. x (or dy) is contiguous [..., T, H, D]; cos/sin broadcast to x.shape[:-2] + [D].


def _rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """cos or sin as contiguous fp32 with one row of D per row of x, i.e. shape x.shape[:-2] + [D] (a copy only when
    it broadcasts or is not contiguous fp32)."""
    if t.dtype == torch.float32 and t.shape[:-1] == x.shape[:-2] and t.is_contiguous():
        return t
    return t.float().expand(*x.shape[:-2], x.shape[-1]).contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str, transpose: bool) -> torch.Tensor:
    if backend == "cpp":
        kernel = torch.ops.r1engine.rope_bwd if transpose else torch.ops.r1engine.rope_fwd
        return kernel(x, _rows(x, cos), _rows(x, sin))
    half = x.shape[-1] // 2
    xf, c, s = x.float(), cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    if transpose:
        xs = xf * s
        return (xf * c + torch.cat([xs[..., half:], -xs[..., :half]], dim=-1)).to(x.dtype)
    return (xf * c + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * s).to(x.dtype)


@custom_op("r1engine::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
    return _rotate(x, cos, sin, backend, transpose=False)


@_rope_op.register_fake
def _(x, cos, sin, backend):
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    _, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backend = backend


def _rope_backward(ctx, grad_y):
    cos, sin = ctx.saved_tensors
    return _rope_backward_op(grad_y.contiguous(), cos, sin, ctx.backend), None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@custom_op("r1engine::rope_backward", mutates_args=())
def _rope_backward_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
    return _rotate(dy, cos, sin, backend, transpose=True)


@_rope_backward_op.register_fake
def _(dy, cos, sin, backend):
    return torch.empty_like(dy)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {what}")
    if x.dim() < 3:
        raise ValueError(f"x: expected shape [..., T, H, D], got shape {list(x.shape)}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x: expected an even head dim D (NeoX rotate_half), got D = {d} in shape {list(x.shape)}")
    want = [*x.shape[:-2], d]
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {what}")
        shape = list(t.shape)
        # right-aligned broadcast check by hand (torch.broadcast_shapes imports sympy, the compiler stack)
        if shape != want and not (
            2 <= len(shape) <= len(want)
            and shape[-1] == d
            and all(a in (1, b) for a, b in zip(shape, want[-len(shape) :], strict=True))
        ):
            raise ValueError(
                f"{name}: expected shape [..., T, D] broadcastable to x.shape[:-2] + [D] = {want}, got {shape}"
            )
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name}: rope gives no gradient to cos/sin, got a tensor that requires grad; detach it, or use "
                "rope_reference to differentiate through it"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected shape {list(cos.shape)} (as cos), got {list(sin.shape)}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable (in ``x`` only) NeoX rotary embedding: ``x [..., T, H, D]`` (D even; fp32/bf16 on ``"cpp"``,
    any float dtype on ``"torch"``; non-contiguous inputs are copied to contiguous), ``cos/sin [..., T, D]`` whose
    leading dims broadcast to x's (e.g. ``[1, T, D]`` for a batch). Returns ``[..., T, H, D]`` in x's dtype."""
    _check(x, cos, sin)
    name = resolve_cpu_kernel(_BACKENDS, backend, x, "x")
    x = x.contiguous()
    if name == "cpp" and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
        # nothing for autograd to record and not tracing: the kernel directly, without the operator's Python layers
        return torch.ops.r1engine.rope_fwd(x, _rows(x, cos), _rows(x, sin))
    return _rope_op(x, cos, sin, name)
