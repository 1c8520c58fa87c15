"""Attention over packed (variable-length) sequences that never attends across sequence boundaries.

`varlen_attention(q, k, v, cu_seqlens, max_seqlen)` takes the flash-attn varlen layout: q `[total, Hq, D]`,
k/v `[total, Hkv, D]` (grouped-query attention when Hq is a multiple of Hkv), and int32 `cu_seqlens`
`[num_seqs + 1]` with the sequence boundaries. Backends:

- "flash": flash-attn's `flash_attn_varlen_func` (CUDA tensors with flash-attn installed; "auto" picks it then).
- "sdpa_loop": one `scaled_dot_product_attention` call per sequence. Work is sum(len^2), no mask tensor is
  built, and PyTorch's fused CPU kernel (flash-attention style) runs each call. This is the CPU default:
  measured fastest here (benchmarks/results/packing.md), the block-diagonal mask and FlexAttention both
  spend total^2 work or memory (eager FlexAttention on CPU materialises the full score matrix).
- "sdpa_mask": a single SDPA call with a dense block-diagonal (causal) boolean mask `[total, total]`: one kernel
  launch, good for many tiny sequences on GPU, O(total^2) memory.
- "reference": explicit float32 softmax per sequence (the test oracle).

The policy model calls this for packed forwards; keep the signature stable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "flash", "sdpa_loop", "sdpa_mask", "reference"]


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_varlen_func


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
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


def _bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to total={total}, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    return cu


def _sdpa_loop(q, k, v, cu, causal: bool, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu, cu[1:], strict=False):
        if b == a:
            continue
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [H, len, D]
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=0)
            vs = vs.repeat_interleave(groups, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal and b - a > 1, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape[0], q.shape[1], v.shape[2])


def _block_mask(cu: list[int], total: int, causal: bool, device: torch.device) -> torch.Tensor:
    seg = torch.repeat_interleave(
        torch.arange(len(cu) - 1, device=device), torch.tensor(cu, device=device).diff()
    )  # [total]
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return mask


def _sdpa_mask(q, k, v, cu, causal: bool, scale: float) -> torch.Tensor:
    total = q.shape[0]
    groups = q.shape[1] // k.shape[1]
    ks, vs = k.transpose(0, 1), v.transpose(0, 1)
    if groups > 1:
        ks = ks.repeat_interleave(groups, dim=0)
        vs = vs.repeat_interleave(groups, dim=0)
    mask = _block_mask(cu, total, causal, q.device)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), ks, vs, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


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
    _check(q, k, v, cu_seqlens)
    cu = _bounds(cu_seqlens, q.shape[0])
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


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of packed sequences, each attending only to itself (causally by default).

    Args:
        q: `[total, Hq, D]`; k, v: `[total, Hkv, D]` with Hq a multiple of Hkv (GQA).
        cu_seqlens: int32 `[num_seqs + 1]`, 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total.
        max_seqlen: longest sequence (used by the flash-attn kernel).
        causal: causal mask inside each sequence.
        scale: softmax scale, default 1/sqrt(D).
        backend: see the module docstring; "auto" = flash-attn on CUDA when installed, else "sdpa_loop".

    Returns:
        `[total, Hq, D]` in q's dtype. Differentiable (all backends are autograd-traced PyTorch or flash-attn).
    """
    _check(q, k, v, cu_seqlens)
    if backend == "auto":
        backend = "flash" if (q.is_cuda and _flash_varlen() is not None) else "sdpa_loop"
    if backend == "flash":
        fn = _flash_varlen()
        if fn is None or not q.is_cuda:
            raise RuntimeError("backend='flash' needs flash-attn installed and CUDA tensors")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), 0.0, softmax_scale=scale, causal=causal)
    scale_f = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale_f)
    cu = _bounds(cu_seqlens, q.shape[0])
    if backend == "sdpa_loop":
        return _sdpa_loop(q, k, v, cu, causal, scale_f)
    if backend == "sdpa_mask":
        return _sdpa_mask(q, k, v, cu, causal, scale_f)
    raise ValueError(f"backend must be one of auto, flash, sdpa_loop, sdpa_mask, reference; got {backend!r}")
