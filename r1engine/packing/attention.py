"""Attention over packed (variable-length) sequences that never attends across sequence boundaries.

`varlen_attention(q, k, v, cu_seqlens, max_seqlen)` takes the flash-attn varlen layout: q `[total, Hq, D]`,
k/v `[total, Hkv, D]` (grouped-query attention when Hq is a multiple of Hkv), and int32 `cu_seqlens`
`[num_seqs + 1]` with the sequence boundaries. Backends (registered as `VARLEN_ATTENTION` in
`r1engine.ops.backends.registry`, which resolves "auto" and logs once why a faster one was passed over):

- "flash": flash-attn's `flash_attn_varlen_func` (CUDA tensors with flash-attn installed; "auto" picks it then).
- "cpu" (also called "cpp", as the C++ CPU kernels of the other ops): r1engine's C++ kernels
  (`r1engine.ops.varlen_attention`, csrc/core/varlen_attention.*), forward and backward: one task per (sequence, KV
  head) materialises each head's small score block and runs the products with a SIMD micro-kernel; no padding,
  gathers or GQA head copies. The CPU default: "auto" picks it for fp32/bf16 CPU
  tensors when the extension is built (3-4x "sdpa_bucket" on the GRPO shapes, benchmarks/results/attention.md).
- "sdpa_bucket": the CPU fallback ("auto" picks it off CUDA when the kernel is not built or for other dtypes).
  Sequences are sorted by length and split into length buckets; each bucket is one batched SDPA call
  `[seqs, H, P, D]` with every sequence right-padded to the bucket's longest length P. Causal attention needs no
  mask for that padding (real rows never see the later pad rows), so the fused CPU kernel runs with
  `is_causal=True` and skips the upper triangle. The bucket boundaries minimise a cost model
  `call + row * tokens + score * padded causal scores` calibrated by measurement (benchmarks/bench_attention.py,
  results in benchmarks/results/attention.md): many short sequences share a few calls instead of paying Python,
  dispatch and autograd overhead per sequence, while long sequences end up in buckets of their own, which is the
  per-sequence loop. The plan depends only on `cu_seqlens`, so it is cached and the layers of one forward share it.
- "sdpa_loop": one `scaled_dot_product_attention` call per sequence. Work is sum(len^2), no mask tensor is
  built, and PyTorch's fused CPU kernel (flash-attention style) runs each call. The CPU default before
  "sdpa_bucket": the block-diagonal mask and FlexAttention both spend total^2 work or memory
  (benchmarks/results/packing.md), but with many short sequences the ~100 us of per-call overhead (forward +
  backward) dominates.
- "sdpa_mask": a single SDPA call with a dense block-diagonal (causal) boolean mask `[total, total]`: one kernel
  launch, good for many tiny sequences on GPU, O(total^2) memory. On CPU it loses to "sdpa_bucket" everywhere
  measured: a block-diagonal mask over a window of W tokens holding sequences of length l spends ~2W/l times the
  causal work, while padding sorted lengths to their bucket's maximum wastes only the spread within a bucket.
- "reference": explicit float32 softmax per sequence (the test oracle, `r1engine.ops.varlen_attention`).

The policy model calls this for packed forwards; keep the signature stable.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from r1engine.ops import varlen_attention as cpp_kernel
from r1engine.ops.backends import registry
from r1engine.ops.varlen_attention import check_layout, sequence_bounds, varlen_attention_reference

__all__ = ["BACKENDS", "varlen_attention", "varlen_attention_reference"]

Backend = Literal["auto", "flash", "cpu", "cpp", "sdpa_bucket", "sdpa_loop", "sdpa_mask", "reference"]

VARLEN_ATTENTION = registry.register(
    "varlen_attention",
    [
        registry.Backend(
            "flash",
            "flash-attn's flash_attn_varlen_func (CUDA)",
            auto_devices=("cuda",),
            check=registry.importable("flash_attn", optional=("flash_attn",), attr="flash_attn_varlen_func"),
        ),
        registry.Backend(
            "cpu",
            "r1engine's C++ CPU kernels (r1engine.ops.varlen_attention), float32 and bfloat16",
            auto_devices=("cpu",),
            auto_dtypes=(torch.float32, torch.bfloat16),
            check=registry.compiled_op("varlen_attention_fwd"),
            aliases=("cpp",),
        ),
        registry.Backend("sdpa_bucket", "length buckets, one padded SDPA call per bucket"),
        registry.Backend("sdpa_loop", "one SDPA call per sequence", auto=False),
        registry.Backend("sdpa_mask", "one SDPA call with a dense block-diagonal mask", auto=False),
        registry.Backend("reference", "explicit float32 softmax per sequence (the oracle)", auto=False),
    ],
)
BACKENDS = VARLEN_ATTENTION.names


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


# ---- "sdpa_bucket": length buckets, one padded batched SDPA call per bucket ------------------------------------


@dataclass(frozen=True)
class BucketCostModel:
    """Predicted microseconds of one batched SDPA call over `n` sequences padded to length `P` (H query heads,
    head dim D), forward + backward when autograd records it:

        call_us + row_us * n*P*H*D + score_us * n*H*D*P*(P+1)/2      (P*P instead of P*(P+1)/2 when not causal)

    `call_us` is Python, dispatch, the gathers and the autograd nodes of one call; `row_us` the copies and softmax
    bookkeeping per padded element; `score_us` the QK^T and PV work per causal score. Only ratios between the
    terms steer the plan, so constants fitted on one CPU transfer roughly to another.
    """

    call_us: float
    row_us: float
    score_us: float

    def cost(self, num_seqs: int, padded_len: int, heads: int, head_dim: int, causal: bool) -> float:
        scores = padded_len * (padded_len + 1) / 2 if causal else padded_len * padded_len
        return self.call_us + num_seqs * heads * head_dim * (self.row_us * padded_len + self.score_us * scores)


# Fitted by `python benchmarks/bench_attention.py --calibrate` (1 thread, AMD EPYC znver3 with AVX2, torch 2.13, a
# loaded shared box; see benchmarks/results/attention.md). Median relative error of the fits 7-16%. Keys: (autograd
# records the call, dtype is fp32/fp64); reduced precision training runs the math kernel, see _bucket_kernels.
COST_MODELS: dict[tuple[bool, bool], BucketCostModel] = {
    (True, True): BucketCostModel(call_us=490.0, row_us=1.1e-2, score_us=4.4e-4),
    (True, False): BucketCostModel(call_us=710.0, row_us=1.3e-2, score_us=4.6e-4),
    (False, True): BucketCostModel(call_us=170.0, row_us=2.5e-3, score_us=1.2e-4),
    (False, False): BucketCostModel(call_us=180.0, row_us=2.4e-3, score_us=1.2e-4),
}


def cost_model_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> BucketCostModel:
    """The calibrated cost model that applies to this call (training vs inference, full vs reduced precision)."""
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return COST_MODELS[(records_grad, q.dtype in (torch.float32, torch.float64))]


@dataclass(frozen=True)
class LengthBucket:
    """Sequences (by start offset, all of length <= padded_len) that share one padded SDPA call."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    padded_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.starts)


def plan_length_buckets(
    lengths: list[int], heads: int, head_dim: int, causal: bool, model: BucketCostModel
) -> list[tuple[int, int]]:
    """Optimal split of the sorted distinct lengths into contiguous buckets under `model`.

    Returns `(first, last)` index ranges (inclusive) into `sorted(set(lengths))`. Dynamic programming over bucket
    ends, O(distinct^2) worst case; the inner loop stops once a bucket alone costs more than the best split found,
    since growing it downwards only adds sequences at the same padded length.
    """
    distinct = sorted(set(lengths))
    count: dict[int, int] = {}
    for n in lengths:
        count[n] = count.get(n, 0) + 1
    best = [0.0] * (len(distinct) + 1)  # best[j]: cheapest plan for distinct[:j]
    split = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        padded_len, num_seqs, best[j] = distinct[j - 1], 0, math.inf
        for i in range(j - 1, -1, -1):
            num_seqs += count[distinct[i]]
            bucket_cost = model.cost(num_seqs, padded_len, heads, head_dim, causal)
            if bucket_cost >= best[j]:
                break
            if best[i] + bucket_cost < best[j]:
                best[j], split[j] = best[i] + bucket_cost, i
    ranges, j = [], len(distinct)
    while j > 0:
        ranges.append((split[j], j - 1))
        j = split[j]
    return ranges[::-1]


@dataclass(frozen=True)
class BucketPlan:
    """Index tensors that move packed tokens into padded buckets and back (built once per `cu_seqlens`)."""

    buckets: tuple[LengthBucket, ...]
    gathers: tuple[torch.Tensor | None, ...]  # per bucket: packed row of each padded slot [n * P]; None = one slice
    key_masks: tuple[torch.Tensor | None, ...]  # per bucket [n, 1, 1, P] real-key mask (non-causal, padded only)
    token_rows: torch.Tensor  # [total]: row of each packed token in the concatenated bucket outputs


def build_bucket_plan(
    cu: list[int], heads: int, head_dim: int, causal: bool, model: BucketCostModel, device: torch.device
) -> BucketPlan:
    seqs = [(a, b - a) for a, b in zip(cu, cu[1:], strict=False) if b > a]
    distinct = sorted({n for _, n in seqs})
    by_len: dict[int, list[int]] = {}
    for a, n in seqs:
        by_len.setdefault(n, []).append(a)
    buckets, gathers, key_masks, row_of_token = [], [], [], {}
    offset = 0  # first row of this bucket in the concatenated outputs
    for first, last in plan_length_buckets([n for _, n in seqs], heads, head_dim, causal, model):
        members = [(a, n) for n in distinct[first : last + 1] for a in by_len[n]]
        bucket = LengthBucket(tuple(a for a, _ in members), tuple(n for _, n in members), distinct[last])
        padded_len = bucket.padded_len
        slots = []
        for s, (a, n) in enumerate(members):
            for t in range(n):
                row_of_token[a + t] = offset + s * padded_len + t
            # pad slots read the sequence's last token: finite values, and (causal: later than every real row;
            # non-causal: masked as keys) they neither change real outputs nor receive gradient
            slots.extend(range(a, a + n))
            slots.extend([a + n - 1] * (padded_len - n))
        padded = bucket.num_seqs > 1
        gathers.append(torch.tensor(slots, dtype=torch.long, device=device) if padded else None)
        if padded and not causal:
            lens = torch.tensor(bucket.lengths, device=device)
            key_masks.append((torch.arange(padded_len, device=device) < lens[:, None])[:, None, None, :])
        else:
            key_masks.append(None)
        buckets.append(bucket)
        offset += bucket.num_seqs * padded_len
    token_rows = torch.tensor([row_of_token[t] for t in range(cu[-1])], dtype=torch.long, device=device)
    return BucketPlan(tuple(buckets), tuple(gathers), tuple(key_masks), token_rows)


_PLAN_CACHE: OrderedDict[tuple, BucketPlan] = OrderedDict()
_PLAN_CACHE_SIZE = 16  # a forward's layers share one entry; a few micro-batches stay warm for their backward


def _cached_bucket_plan(
    cu: list[int], heads: int, head_dim: int, causal: bool, model: BucketCostModel, device: torch.device
) -> BucketPlan:
    key = (tuple(cu), heads, head_dim, causal, model, str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = build_bucket_plan(cu, heads, head_dim, causal, model, device)
        _PLAN_CACHE[key] = plan
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return plan


_NO_BF16_DOT = ("DEFAULT", "AVX2", "AVX512")  # torch's CPU capability names below AVX512_BF16 / AMX


def _bucket_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[SDPBackend]:
    """SDPA kernels to allow. On CPUs without native bf16 dot products (AVX2) the fused flash kernel's bf16/fp16
    backward measured 2.5-3x slower than the math kernel (which "sdpa_loop" reached through 3-D inputs)."""
    reduced = q.dtype in (torch.bfloat16, torch.float16)
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and reduced and records_grad and torch.backends.cpu.get_cpu_capability() in _NO_BF16_DOT:
        return [SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def _sdpa_bucket(q, k, v, cu, causal: bool, scale: float, model: BucketCostModel | None = None) -> torch.Tensor:
    total, hq, d = q.shape
    if total == 0:
        return q.new_empty(0, hq, v.shape[2])
    plan = _cached_bucket_plan(cu, hq, d, causal, model or cost_model_for(q, k, v), q.device)
    groups = hq // k.shape[1]
    kernels = _bucket_kernels(q, k, v)
    outs = []
    for bucket, gather, key_mask in zip(plan.buckets, plan.gathers, plan.key_masks, strict=True):
        n, padded_len = bucket.num_seqs, bucket.padded_len
        if gather is None:  # a lone sequence: views, no padding
            a = bucket.starts[0]
            qs, ks, vs = (t[a : a + padded_len].transpose(0, 1)[None] for t in (q, k, v))
        else:
            qs, ks, vs = (
                t.index_select(0, gather).view(n, padded_len, t.shape[1], d).transpose(1, 2) for t in (q, k, v)
            )
        if groups > 1:  # explicit KV heads, as "sdpa_loop" (the math kernel would repeat them anyway)
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        with sdpa_kernel(kernels):
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=key_mask, is_causal=causal and padded_len > 1, scale=scale
            )
        outs.append(o.transpose(1, 2).reshape(n * padded_len, hq, v.shape[2]))
    return torch.cat(outs).index_select(0, plan.token_rows)


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
        backend: see the module docstring (`BACKENDS`; "cpp" is another name of "cpu"); "auto" = flash-attn on CUDA
            when installed, the C++ kernel ("cpu") for fp32/bf16 CPU tensors when the extension has it, else
            "sdpa_bucket" (after logging once why a faster one was passed over, r1engine.ops.backends.registry).

    Returns:
        `[total, Hq, D]` in q's dtype. Differentiable (autograd-traced PyTorch, flash-attn, or the C++ kernel's
        registered backward).
    """
    check_layout(q, k, v, cu_seqlens)
    backend = VARLEN_ATTENTION.resolve(backend, q.device, q.dtype)
    if backend == "flash":
        if not q.is_cuda or VARLEN_ATTENTION.backend("flash").unavailable() is not None:
            raise RuntimeError("backend='flash' needs flash-attn installed and CUDA tensors")
        fn = importlib.import_module("flash_attn").flash_attn_varlen_func
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), 0.0, softmax_scale=scale, causal=causal)
    scale_f = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "cpu":
        return cpp_kernel.varlen_attention(q, k, v, cu_seqlens, causal=causal, scale=scale_f)
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale_f)
    cu = sequence_bounds(cu_seqlens, q.shape[0])
    if backend == "sdpa_bucket":
        return _sdpa_bucket(q, k, v, cu, causal, scale_f)
    if backend == "sdpa_loop":
        return _sdpa_loop(q, k, v, cu, causal, scale_f)
    return _sdpa_mask(q, k, v, cu, causal, scale_f)
