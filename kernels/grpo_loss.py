"""Triton backend of the fused GRPO loss on materialized logits (the "triton" backend of `r1engine.ops.grpo_loss`).

Implements the three functions of the kernel contract shared with the C++ CPU and CUDA backends:

* `token_logprobs_fwd(logits, targets, temperature) -> (logp, lse)`
* `grpo_fwd(logits, targets, advantages, old_logp, ref_logp, weights, *, ...) -> (loss_tok, logp, lse, dlogp, ratio,
  kl, clipped)`
* `logprobs_bwd(logits, targets, lse, dlogp, *, temperature, inplace) -> grad_logits`

One program handles one token row: an online log-sum-exp (running max + rescaled sum) over vocabulary tiles whose
out-of-range lanes are loaded as -inf (never 0: a zero-padded lane adds exp(0) to the sum), then the per-token GRPO
math in fp32. Rows with weight 0 (prompt / padding tokens) return before reading the row; the backward writes zeros
for rows with dlogp == 0 without reading them, and can overwrite the logits in place so that no second [N, V]
buffer exists.

Hyperparameters (temperature, eps, dual-clip, beta) are runtime fp32 kernel arguments listed in
`do_not_specialize`, so a new value neither recompiles the kernel nor specializes it to fp64 (the Liger PR #1366
failure mode); only the structural switches (has old / has ref, KL estimator, tile size) are `tl.constexpr`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["token_logprobs_fwd", "grpo_fwd", "logprobs_bwd", "default_block_v"]

# Defaults for an H100 at V=151936 bf16, no autotuning: 4096-lane tiles give 16 B (8 x bf16) per thread per load at
# 8 warps, ~37 tiles per row, and one program per row keeps 16k programs in flight for N=16384.
# V and the row stride are deliberately left specializable: triton then knows when they are multiples of 16
# (151936, 152064, 32000 are) and emits 16-byte vector loads/stores (checked on the sm_90 PTX: ld.global.v4 /
# st.global.v4); with them in do_not_specialize every lane would load 2 bytes at a time.
_MAX_BLOCK_V = 4096


def default_block_v(vocab: int) -> int:
    """Vocabulary tile for a row of `vocab` entries: the next power of two, capped at 4096."""
    return max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(vocab)))


def _num_warps(block_v: int) -> int:
    return max(1, min(16, block_v // 512))


@triton.jit
def _row_lse(row_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of row[v] * inv_t over v < V, one pass, fp32; lanes past V are -inf."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # m is -inf only before the first tile; the first tile always has a valid lane, so m_new is finite.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit(do_not_specialize=["temperature"])
def _token_logprobs_kernel(
    logits_ptr, stride_row, targets_ptr, logp_ptr, lse_ptr, V, temperature, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / temperature
    row_ptr = logits_ptr + row * stride_row
    lse = _row_lse(row_ptr, V, inv_t, BLOCK_V)
    tgt = tl.load(targets_ptr + row)
    x_t = tl.load(row_ptr + tgt).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, x_t - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["temperature", "eps_low", "eps_high", "dual_clip", "beta"])
def _grpo_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    adv_ptr,
    old_ptr,
    ref_ptr,
    weights_ptr,
    loss_ptr,
    logp_ptr,
    lse_ptr,
    dlogp_ptr,
    ratio_ptr,
    kl_ptr,
    clipped_ptr,
    V,
    temperature,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_EST: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(weights_ptr + row).to(tl.float32)
    if w == 0.0:
        return  # outputs were pre-filled with 0 (ratio with 1): a masked row costs nothing
    inv_t = 1.0 / temperature
    row_ptr = logits_ptr + row * stride_row
    lse = _row_lse(row_ptr, V, inv_t, BLOCK_V)
    tgt = tl.load(targets_ptr + row)
    logp = tl.load(row_ptr + tgt).to(tl.float32) * inv_t - lse
    adv = tl.load(adv_ptr + row).to(tl.float32)
    if HAS_OLD:
        ratio = tl.exp(logp - tl.load(old_ptr + row).to(tl.float32))
    else:
        ratio = tl.full((), 1.0, tl.float32)  # on-policy: old := logp (detached)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    unclipped = ratio * adv
    surr = tl.minimum(unclipped, tl.minimum(tl.maximum(ratio, lo), hi) * adv)
    clip = ((ratio < lo) & (adv < 0.0)) | ((ratio > hi) & (adv > 0.0))
    dc = dual_clip
    dual = (dc > 1.0) & (adv < 0.0) & (ratio > dc)  # then ratio * A < dc * A: the loss is bounded at -dc * A
    surr = tl.where(dual, dc * adv, surr)
    clip = clip | dual
    dsurr = tl.where(clip, 0.0, unclipped)  # d surr / d logp = d ratio / d logp * A = ratio * A on the unclipped branch
    b = beta
    kl = tl.full((), 0.0, tl.float32)
    dkl = tl.full((), 0.0, tl.float32)
    if HAS_KL:
        d = tl.load(ref_ptr + row).to(tl.float32) - logp
        if KL_EST == 1:
            kl = -d
            dkl = tl.full((), 1.0, tl.float32)
        elif KL_EST == 2:
            kl = 0.5 * d * d
            dkl = -d
        else:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
    tl.store(loss_ptr + row, w * (b * kl - surr))
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    tl.store(dlogp_ptr + row, w * (b * dkl - dsurr))
    tl.store(ratio_ptr + row, ratio)
    tl.store(kl_ptr + row, kl)
    tl.store(clipped_ptr + row, clip.to(tl.float32))


@triton.jit(do_not_specialize=["temperature"])
def _logprobs_bwd_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    targets_ptr,
    lse_ptr,
    dlogp_ptr,
    V,
    temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    g_row = grad_ptr + row * stride_grad
    dl = tl.load(dlogp_ptr + row).to(tl.float32)
    if dl == 0.0:
        zero = tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, zero, mask=cols < V)
    else:
        inv_t = 1.0 / temperature
        scale = dl * inv_t
        lse = tl.load(lse_ptr + row)
        tgt = tl.load(targets_ptr + row)
        x_row = logits_ptr + row * stride_row
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            x = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            p = tl.exp(x * inv_t - lse)
            g = (tl.where(cols == tgt, 1.0, 0.0) - p) * scale
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Python wrappers (the backend-module interface)


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V]; got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16; got {logits.dtype}")
    if logits.shape[1] > 0 and logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous (stride(1) == 1); got strides {logits.stride()}")
    n, v = logits.shape
    if v == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V > 0)")
    if targets.shape != (n,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape ({n},); got {targets.dtype} {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets must be on {logits.device}; got {targets.device}")
    return n, v


def _check_vec(name: str, t: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},); got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")
    return t.contiguous().float()


def _check_targets_range(targets: torch.Tensor, v: int) -> None:
    if targets.numel() and bool(((targets < 0) | (targets >= v)).any()):  # one host sync
        raise ValueError(f"targets must lie in [0, {v}); got range [{int(targets.min())}, {int(targets.max())}]")


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) at `temperature` and the row log-sum-exp, both fp32 [N]."""
    n, v = _check_logits(logits, targets)
    _check_targets_range(targets, v)
    targets = targets.contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, lse
    bv = block_v or default_block_v(v)
    _token_logprobs_kernel[(n,)](
        logits, logits.stride(0), targets, logp, lse, v, float(temperature), BLOCK_V=bv, num_warps=_num_warps(bv)
    )
    return logp, lse


def grpo_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    beta: float = 0.0,
    kl_estimator: int = 3,
    block_v: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused GRPO forward: (loss_tok, logp, lse, dlogp, ratio, kl, clipped), all fp32 [N]; see the module doc."""
    n, v = _check_logits(logits, targets)
    if kl_estimator not in (1, 2, 3):
        raise ValueError(f"kl_estimator must be 1, 2 or 3; got {kl_estimator}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    dev = logits.device
    advantages = _check_vec("advantages", advantages, n, dev)
    weights = _check_vec("weights", weights, n, dev)
    old_logp = _check_vec("old_logp", old_logp, n, dev)
    ref_logp = _check_vec("ref_logp", ref_logp, n, dev)
    _check_targets_range(targets, v)
    targets = targets.contiguous()
    outs = [torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(7)]
    outs[4].fill_(1.0)  # ratio of skipped rows (separate tensors: custom ops may not return aliasing outputs)
    if n == 0:
        return tuple(outs)
    has_kl = ref_logp is not None and beta != 0.0
    dummy = outs[0]
    bv = block_v or default_block_v(v)
    _grpo_fwd_kernel[(n,)](
        logits,
        logits.stride(0),
        targets,
        advantages,
        old_logp if old_logp is not None else dummy,
        ref_logp if has_kl else dummy,
        weights,
        *outs,
        v,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip or 0.0),
        float(beta),
        HAS_OLD=old_logp is not None,
        HAS_KL=has_kl,
        KL_EST=int(kl_estimator),
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return tuple(outs)


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """grad[i, v] = (onehot(t_i)[v] - softmax(logits_i / T)[v]) * dlogp_i / T in the logits' dtype.

    With `inplace=True` the gradient overwrites `logits` (each tile is read before it is written, by the same
    program) and `logits` is returned.
    """
    n, v = _check_logits(logits, targets)
    lse = _check_vec("lse", lse, n, logits.device)
    dlogp = _check_vec("dlogp", dlogp, n, logits.device)
    targets = targets.contiguous()
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    bv = block_v or default_block_v(v)
    _logprobs_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        targets,
        lse,
        dlogp,
        v,
        float(temperature),
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return grad
