"""Triton backend of the vocabulary passes of the GRPO-family losses on materialized logits (the "triton" backend of
`r1engine.ops.grpo_loss`).

Implements the two functions of the backend contract shared with the C++ CPU and CUDA backends (semantics:
`r1engine.ops.backends.torch_ref`; the O(N) per-token loss math on their results is one PyTorch implementation for
every backend, `r1engine.algo.policy_loss`):

* `logprobs_fwd(logits, targets, *, temperature, live=None, entropy=False) -> (logp, lse, entropy)`, fp32 [N] each:
  lse = logsumexp(z), logp = z[target] - lse and, when asked, entropy = -sum_v p_v log p_v, with z = logits / T;
  rows with live == 0 are skipped (all outputs 0 there).
* `logprobs_bwd(logits, targets, lse, dlogp, *, temperature, inplace, dentropy=None, entropy=None) -> grad_logits`:
  grad[i, v] = ((onehot(t_i)[v] - p_v) * dlogp_i - dentropy_i * p_v * (z_v - lse_i + entropy_i)) / T in the logits'
  dtype, the gradient of sum_i dlogp_i * logp_i + dentropy_i * entropy_i.

One program handles one token row: an online log-sum-exp (running max + rescaled sum) over vocabulary tiles whose
out-of-range lanes are loaded as -inf (never 0: a zero-padded lane adds exp(0) to the sum). The entropy comes from
the same pass: beside s = sum exp(z - m) the program keeps u = sum exp(z - m) * (z - m), rescaled together with s when
the max grows (u' = (u + (m - m') * s) * exp(m - m')), and H = log(s) - u / s (= lse - E_p[z], without the
cancellation of two large numbers). -inf logits (p = 0) contribute 0 to both sums, never 0 * -inf = NaN. Rows that
are not live return before reading the row; the backward writes zeros for rows whose dlogp and dentropy are both 0
without reading them, and can overwrite the logits in place so that no second [N, V] buffer exists.

The temperature is a runtime fp32 kernel argument listed in `do_not_specialize`, so a new value neither recompiles
the kernel nor specializes it to fp64 (the Liger PR #1366 failure mode); only the structural switches (live mask
given, entropy on, tile size) are `tl.constexpr`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["logprobs_fwd", "logprobs_bwd", "default_block_v"]

# Defaults for an H100 at V=151936 bf16, no autotuning: 4096-lane tiles give 16 B (8 x bf16) per thread per load at
# 8 warps, ~37 tiles per row, and one program per row keeps 16k programs in flight for N=16384.
# V and the row stride are deliberately left specializable: triton then knows when they are multiples of 16
# (151936, 152064, 32000 are) and emits 16-byte vector loads/stores (checked on the sm_90 PTX: ld.global.v4 /
# st.global.v4); with them in do_not_specialize every lane would load 2 bytes at a time.
_MAX_BLOCK_V = 4096
# Clamp for differences with -inf: exp(-inf) = 0 and 0 * _NEG_BIG = 0, where 0 * -inf would be NaN.
_NEG_BIG = tl.constexpr(-3.0e38)


def default_block_v(vocab: int) -> int:
    """Vocabulary tile for a row of `vocab` entries: the next power of two, capped at 4096."""
    return max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(vocab)))


def _num_warps(block_v: int) -> int:
    return max(1, min(16, block_v // 512))


@triton.jit
def _row_stats(row_ptr, V, inv_t, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online softmax statistics of z = row[v] * inv_t over v < V in one pass, fp32: (m, s, u) with m the max,
    s = sum exp(z - m) and (ENTROPY) u = sum exp(z - m) * (z - m); lanes past V are -inf."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    u = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While everything so far is -inf (a tile of -inf logits), rescale against 0: exp(-inf - 0) = 0, no NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        f = tl.exp(m - m_ref)  # 0 before the first finite value
        d = z - m_ref
        e = tl.exp(d)
        if ENTROPY:
            u = (u + tl.maximum(m - m_ref, _NEG_BIG) * s) * f + tl.sum(e * tl.maximum(d, _NEG_BIG), axis=0)
        s = s * f + tl.sum(e, axis=0)
        m = m_new
    return m, s, u


@triton.jit(do_not_specialize=["temperature"])
def _logprobs_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    live_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    V,
    temperature,
    HAS_LIVE: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    skip = False
    if HAS_LIVE:
        skip = tl.load(live_ptr + row) == 0.0
    if skip:  # not live: all outputs 0, and the row is never read
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if ENTROPY:
            tl.store(ent_ptr + row, 0.0)
    else:
        inv_t = 1.0 / temperature
        row_ptr = logits_ptr + row * stride_row
        m, s, u = _row_stats(row_ptr, V, inv_t, ENTROPY, BLOCK_V)
        log_s = tl.log(s)
        lse = m + log_s
        tgt = tl.load(targets_ptr + row)
        x_t = tl.load(row_ptr + tgt).to(tl.float32) * inv_t
        tl.store(logp_ptr + row, x_t - lse)
        tl.store(lse_ptr + row, lse)
        if ENTROPY:
            tl.store(ent_ptr + row, log_s - u / s)


@triton.jit(do_not_specialize=["temperature"])
def _logprobs_bwd_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    targets_ptr,
    lse_ptr,
    dlogp_ptr,
    dent_ptr,
    ent_ptr,
    V,
    temperature,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    g_row = grad_ptr + row * stride_grad
    dl = tl.load(dlogp_ptr + row).to(tl.float32)
    de = tl.full((), 0.0, tl.float32)
    if HAS_ENT:
        de = tl.load(dent_ptr + row).to(tl.float32)
    if (dl == 0.0) & (de == 0.0):
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
        if HAS_ENT:
            e = de * inv_t
            # c = lse - H, so that z - lse + H = z - c; read only where the entropy term is on
            c = tl.where(de != 0.0, lse - tl.load(ent_ptr + row).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            z = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(z - lse)
            onehot = tl.where(cols == tgt, 1.0, 0.0)
            if HAS_ENT:
                # p = 0 (a -inf logit): the term is 0; z is replaced by c there so that no inf reaches the product
                zc = tl.where(p > 0.0, z, c)
                g = onehot * scale - p * (scale + e * (zc - c))
            else:
                g = (onehot - p) * scale
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


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return float(temperature)


def _check_targets_range(targets: torch.Tensor, v: int) -> None:
    if targets.numel() and bool(((targets < 0) | (targets >= v)).any()):  # one host sync
        raise ValueError(f"targets must lie in [0, {v}); got range [{int(targets.min())}, {int(targets.max())}]")


def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    live: torch.Tensor | None = None,
    entropy: bool = False,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logp, lse, entropy)`, fp32 [N] each (entropy all 0 unless asked); rows with `live == 0` are 0 and unread."""
    n, v = _check_logits(logits, targets)
    temperature = _check_temperature(temperature)
    live = _check_vec("live", live, n, logits.device)
    _check_targets_range(targets, v)
    targets = targets.contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = (torch.empty if entropy else torch.zeros)(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, lse, ent
    bv = block_v or default_block_v(v)
    _logprobs_fwd_kernel[(n,)](
        logits,
        logits.stride(0),
        targets,
        live if live is not None else logp,  # dummy pointer when there is no mask (never read)
        logp,
        lse,
        ent,
        v,
        temperature,
        HAS_LIVE=live is not None,
        ENTROPY=bool(entropy),
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return logp, lse, ent


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float,
    inplace: bool,
    dentropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """grad[i, v] = ((onehot(t_i)[v] - p_v) * dlogp_i - dentropy_i * p_v * (z_v - lse_i + entropy_i)) / T in the
    logits' dtype, with z = logits / T and p = softmax(z); rows whose dlogp and dentropy are 0 are exact zeros.

    With `inplace=True` the gradient overwrites `logits` (each tile is read before it is written, by the same
    program) and `logits` is returned.
    """
    n, v = _check_logits(logits, targets)
    temperature = _check_temperature(temperature)
    if (dentropy is None) != (entropy is None):
        raise ValueError("dentropy and entropy must be given together (or neither)")
    dev = logits.device
    lse = _check_vec("lse", lse, n, dev)
    dlogp = _check_vec("dlogp", dlogp, n, dev)
    dentropy = _check_vec("dentropy", dentropy, n, dev)
    entropy = _check_vec("entropy", entropy, n, dev)
    targets = targets.contiguous()
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    has_ent = dentropy is not None
    bv = block_v or default_block_v(v)
    _logprobs_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        targets,
        lse,
        dlogp,
        dentropy if has_ent else dlogp,  # dummy pointers without the entropy term (never read)
        entropy if has_ent else dlogp,
        v,
        temperature,
        HAS_ENT=has_ent,
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return grad
