"""Attention of packed variable-length sequences on the CPU, forward and backward in C++:
``varlen_attention(q, k, v, cu_seqlens, causal=True, scale=None)`` with q ``[total, Hq, D]``, k/v ``[total, Hkv, D]``
(grouped-query attention when Hq is a multiple of Hkv) and int32 ``cu_seqlens [num_seqs + 1]``; each sequence
attends only to itself. The backend "cpu" of ``r1engine.packing.attention.varlen_attention``.

A ``torch.library`` operator (``r1engine.ops._library.custom_op``: fake kernel + autograd formula, so it works under
autograd and ``torch.compile(fullgraph=True)``, and eager calls do not import the compiler) over the kernels
``torch.ops.r1engine.varlen_attention_fwd/bwd`` (csrc/core/varlen_attention.*). The forward returns the output and
one fp32 log-sum-exp per query row and head; the backward saves only q, k, v, the output and the lse (plus
``cu_seqlens``) and recomputes the probabilities (flash-attention style):

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q

with dK and dV summed over the query heads that share a KV head. fp32 and bf16 tensors (fp32 accumulation); the
backward is deterministic. Why a kernel: the sequences of a GRPO batch are short (tens to a few hundred tokens),
so PyTorch's padded, bucketed SDPA spends much of its time on gathers, padding, GQA head copies and autograd
bookkeeping around small products (benchmarks/results/attention.md). ``varlen_attention_reference`` is the
per-sequence float32 oracle of this kernel and of every backend of ``r1engine.packing.attention``.
Eager calls that record no autograd graph (``torch.no_grad()``, inputs that need no gradient) call the kernel
directly, skipping the operator's Python layers.
"""

from __future__ import annotations

import math

import torch

from r1engine import _ext
from r1engine.ops._library import custom_op

__all__ = ["varlen_attention", "varlen_attention_reference", "available", "check_layout", "sequence_bounds"]

_CPP_OP = "varlen_attention_fwd"
_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """True when the compiled extension has the kernels."""
    return _ext.has_op(_CPP_OP)


# ----------------------------------------------------------------------------------------------------------------
# The reference (the oracle of every backend of r1engine.packing.attention.varlen_attention) and its input checks.


def check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """The packed layout every backend of packed attention takes (any device and dtype): q `[total, Hq, D]`,
    k/v `[total, Hkv, D]` with Hq a multiple of Hkv, int32 `cu_seqlens [num_seqs + 1]`; a ValueError otherwise."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [total, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [total, Hq, D] and k [total, Hkv, D] disagree: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"Hq ({q.shape[1]}) must be a multiple of Hkv ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be int32 [num_seqs + 1], got dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )


def sequence_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """`cu_seqlens` as a list, checked to rise from 0 to `total` (a ValueError naming it otherwise)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to total={total}, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    return cu


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-sequence attention with an explicit float32 softmax (the oracle); returns q's dtype."""
    check_layout(q, k, v, cu_seqlens)
    cu = sequence_bounds(cu_seqlens, q.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for a, b in zip(cu, cu[1:], strict=False):
        if b == a:
            continue
        qs = q[a:b].float().transpose(0, 1)
        ks = k[a:b].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[a:b].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        s = qs @ ks.transpose(-1, -2) * scale
        if causal:
            n = b - a
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Operators. q [total, Hq, D], k/v [total, Hkv, D] contiguous; cu_seqlens int32 [num_seqs + 1].


@custom_op("r1engine::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.r1engine.varlen_attention_fwd(q, k, v, cu_seqlens, scale, causal)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale, causal):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(
        dout.to(q.dtype).contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale, ctx.causal
    )
    return dq, dk, dv, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


@custom_op("r1engine::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.r1engine.varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, scale, causal)


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            what = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a tensor [total, heads, head_dim], got {what}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float32 or bfloat16, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k: expected [{q.shape[0]}, kv_heads, {q.shape[2]}] to match q {list(q.shape)}, got {list(k.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        what = f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens: expected int32 [num_seqs + 1], got {what}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Differentiable attention of packed sequences (C++ CPU kernel): q ``[total, Hq, D]``, k/v ``[total, Hkv, D]``
    (fp32 or bf16, one dtype, CPU), int32 ``cu_seqlens [num_seqs + 1]`` rising from 0 to total (empty sequences
    allowed); ``scale`` defaults to ``1/sqrt(D)``. Returns ``[total, Hq, D]`` in q's dtype; gradients reach q, k, v.
    The ``cu_seqlens`` bounds are checked by the kernel (RuntimeError naming the argument)."""
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (dynamo would trace into the cached extension lookup)
        _ext.require(_CPP_OP)
    _check(q, k, v, cu_seqlens)
    scale_f = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grad and not compiling:
        # nothing for autograd to record and not tracing: the kernel directly, without the operator's Python layers
        return torch.ops.r1engine.varlen_attention_fwd(q, k, v, cu_seqlens, scale_f, bool(causal))[0]
    out, _ = _varlen_attention_op(q, k, v, cu_seqlens, scale_f, bool(causal))
    return out
