"""Triton kernels for the lm_head-fused GRPO loss: per-token log-probs straight from hidden states and the head weight.

`logits = hidden @ weight.T / T` is never written to memory:

* forward (`linear_logprobs_fwd`): a tile GEMM (BM tokens x BN vocabulary columns, fp32 accumulator, K loop over H)
  feeds an online log-sum-exp per token and picks the target logit out of the tile. The vocabulary is split across
  a second grid axis so that small token counts still fill the GPU; each split writes a partial (max, sum, target
  logit) and a tiny O(splits x N) combine gives lse and logp. Columns past V are set to -inf before the exp (a
  zero-filled tile would add exp(0) per padded lane: verl's reward-collapse bug). With `entropy=True` each split
  also keeps u = sum exp(z - m) * (z - m), rescaled with the sum when the max grows, and the combine gives
  H = -sum p log p = log(s) - u / s (z = logits / T, s and u taken at the row max).
* backward (`linear_logprobs_bwd`): for one vocabulary chunk at a time a Triton kernel recomputes the logit tiles
  and writes `G = ((onehot - p) * g - e * p * (z - lse + H)) / T` for that chunk only (g = d loss / d logp and
  e = d loss / d entropy, 0 without the entropy term; [M, Vc] in the input dtype, Vc sized to a memory budget,
  never [M, V]); two GEMMs then give `dW[chunk] = G^T @ X` (one GEMM per chunk, fp32 accumulation inside, written
  once) and `dX += G @ W[chunk]` accumulated across chunks in an fp32 buffer. No atomics anywhere: the result is
  deterministic run to run.

Callers pass only the tokens that carry loss (the compaction happens in `r1engine.ops.linear_grpo_loss`): masked
tokens cost nothing. Everything here takes and returns plain tensors; the GRPO math on the per-token log-probs
(O(N), negligible) lives in the public op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd", "TileConfig", "default_config"]

# Clamp for differences with -inf (padded columns): exp(-inf) = 0 and 0 * _NEG_BIG = 0, where 0 * -inf would be NaN.
_NEG_BIG = tl.constexpr(-3.0e38)


class TileConfig:
    """Tile sizes and launch options for the fused kernels (one object, no autotuning).

    bm x bn x bk: GEMM tile; group_m: token blocks that consecutive programs share (L2 reuse of the hidden rows,
    as in a grouped-order GEMM); tiles_per_split: vocabulary tiles each forward program walks with its online
    log-sum-exp (None: one split, unless `min_programs` asks for more); chunk_bytes: budget of the backward's
    [M, Vc] dlogits chunk.
    """

    def __init__(
        self,
        bm: int,
        bn: int,
        bk: int,
        num_warps: int,
        num_stages: int,
        *,
        group_m: int = 8,
        tiles_per_split: int | None = 2,
        chunk_bytes: int = 1 << 30,
    ):
        self.bm, self.bn, self.bk = bm, bn, bk
        self.num_warps, self.num_stages = num_warps, num_stages
        self.group_m, self.tiles_per_split, self.chunk_bytes = group_m, tiles_per_split, chunk_bytes

    def __repr__(self) -> str:
        return (
            f"TileConfig(bm={self.bm}, bn={self.bn}, bk={self.bk}, warps={self.num_warps}, stages={self.num_stages}, "
            f"group_m={self.group_m}, tiles_per_split={self.tiles_per_split}, chunk_bytes={self.chunk_bytes})"
        )


def default_config(dtype: torch.dtype, device: torch.device) -> TileConfig:
    """H100 defaults (bf16: 128x128x64, 8 warps, 3 stages; fp32: 64x128x32); small tiles under the interpreter.

    128x256 tiles (what a plain GEMM would use) leave no registers for the softmax epilogue: compiled for sm_90
    they hit 255 registers and spill (272 B of stack in the forward), while 128x128 compiles without spills
    (checked with cuobjdump in tests/test_triton_sm90_codegen.py).
    """
    if device.type != "cuda":  # TRITON_INTERPRET=1: tiny tiles keep the numpy interpreter fast and exercise tails
        return TileConfig(16, 32, 16, 1, 1, group_m=2, tiles_per_split=None, chunk_bytes=1 << 14)
    if dtype == torch.float32:
        return TileConfig(64, 128, 32, 8, 2, tiles_per_split=4)
    return TileConfig(128, 128, 64, 8, 3, tiles_per_split=4)


@triton.jit
def _grouped_pid(pid, m_blocks, n_blocks, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D program id in grouped order: GROUP_M token blocks x all vocabulary blocks, so the
    programs running at the same time share a few hidden-row blocks and a few weight tiles in L2."""
    per_group = GROUP_M * n_blocks
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _logit_tile(
    x_ptr,
    w_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    stride_x,
    stride_w,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """acc[BM, BN] = X[rows] @ W[cols]^T in fp32 (out-of-range rows/cols read as 0; callers mask them)."""
    acc = tl.zeros((BM, BN), tl.float32)
    ks0 = tl.arange(0, BK)
    for k0 in range(0, H, BK):
        ks = k0 + ks0
        k_ok = ks < H
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit(do_not_specialize=["M", "inv_t", "cols_per_split", "m_blocks", "splits"])
def _fwd_kernel(
    x_ptr,
    w_ptr,
    targets_ptr,
    part_m_ptr,
    part_s_ptr,
    part_t_ptr,
    part_u_ptr,
    M,
    V,
    H,
    stride_x,
    stride_w,
    inv_t,
    cols_per_split,
    m_blocks,
    splits,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    GROUP_M: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    pid_m, pid_s = _grouped_pid(tl.program_id(0), m_blocks, splits, GROUP_M)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    u = tl.zeros((BM,), tl.float32)
    t_logit = tl.zeros((BM,), tl.float32)
    for v0 in range(v_lo, v_hi, BN):
        cols = v0 + tl.arange(0, BN)
        col_ok = cols < v_hi
        z = _logit_tile(x_ptr, w_ptr, rows, cols.to(tl.int64), row_ok, col_ok, H, stride_x, stride_w, BM, BN, BK, IEEE)
        z = tl.where(col_ok[None, :], z * inv_t, float("-inf"))  # never let a padded column reach the exp as 0
        m_new = tl.maximum(m, tl.max(z, axis=1))  # every tile has a valid column, so m_new is finite
        f = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if ENTROPY:  # u rescaled to the new max: (u + (m - m_new) * s) * f; m = -inf (s = 0) at the first tile
            u = (u + tl.maximum(m - m_new, _NEG_BIG) * s) * f + tl.sum(e * tl.maximum(d, _NEG_BIG), axis=1)
        s = s * f + tl.sum(e, axis=1)
        m = m_new
        t_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s * M + rows
    tl.store(part_m_ptr + out, m, mask=row_ok)
    tl.store(part_s_ptr + out, s, mask=row_ok)
    tl.store(part_t_ptr + out, t_logit, mask=row_ok)
    if ENTROPY:
        tl.store(part_u_ptr + out, u, mask=row_ok)


@triton.jit(do_not_specialize=["M", "inv_t", "m_blocks", "n_blocks"])
def _dlogits_kernel(
    x_ptr,
    w_ptr,
    targets_ptr,
    lse_ptr,
    g_ptr,
    dent_ptr,
    ent_ptr,
    out_ptr,
    M,
    H,
    stride_x,
    stride_w,
    stride_out,
    v_lo,
    v_hi,
    inv_t,
    m_blocks,
    n_blocks,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_ENT: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), m_blocks, n_blocks, GROUP_M)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    local = pid_n * BN + tl.arange(0, BN)
    cols = v_lo + local
    col_ok = cols < v_hi
    z = _logit_tile(x_ptr, w_ptr, rows, cols.to(tl.int64), row_ok, col_ok, H, stride_x, stride_w, BM, BN, BK, IEEE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_t
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    zs = z * inv_t  # finite everywhere (padded columns computed as 0), masked out of p below
    p = tl.exp(tl.where(col_ok[None, :], zs - lse[:, None], float("-inf")))
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    if HAS_ENT:
        e = tl.load(dent_ptr + rows, mask=row_ok, other=0.0) * inv_t
        c = lse - tl.load(ent_ptr + rows, mask=row_ok, other=0.0)  # z - lse + H = z - c
        d = onehot * g[:, None] - p * (g[:, None] + e[:, None] * (zs - c[:, None]))
    else:
        d = (onehot - p) * g[:, None]
    ptrs = out_ptr + rows[:, None] * stride_out + local[None, :]
    tl.store(ptrs, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [M, H] and weight [V, H] with the same H; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    m = hidden.shape[0]
    if targets.shape != (m,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape ({m},); got {targets.dtype} {tuple(targets.shape)}")
    return m, weight.shape[0], hidden.shape[1]


@torch.no_grad()
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    config: TileConfig | None = None,
    min_programs: int | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(logp, lse) fp32 [M] of log_softmax(hidden @ weight.T / T)[i, targets[i]], without materializing logits;
    with `entropy=True`, (logp, lse, entropy) with entropy = -sum_v p_v log p_v of softmax(hidden @ weight.T / T),
    from the same pass over the vocabulary."""
    m, v, h = _check(hidden, weight, targets)
    dev = hidden.device
    if m == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return (z, z.clone(), z.clone()) if entropy else (z, z.clone())
    cfg = config or default_config(hidden.dtype, dev)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    m_blocks = triton.cdiv(m, cfg.bm)
    n_tiles = triton.cdiv(v, cfg.bn)
    if min_programs is not None:
        splits = max(1, min(n_tiles, triton.cdiv(min_programs, m_blocks)))
    elif cfg.tiles_per_split is not None:
        splits = triton.cdiv(n_tiles, cfg.tiles_per_split)
    else:
        splits = 1
    cols_per_split = triton.cdiv(n_tiles, splits) * cfg.bn
    splits = triton.cdiv(v, cols_per_split)  # every split non-empty
    part = torch.empty(4 if entropy else 3, splits, m, dtype=torch.float32, device=dev)
    _fwd_kernel[(m_blocks * splits,)](
        hidden,
        weight,
        targets,
        part[0],
        part[1],
        part[2],
        part[3] if entropy else part[2],  # (never written without the entropy)
        m,
        v,
        h,
        hidden.stride(0),
        weight.stride(0),
        1.0 / float(temperature),
        cols_per_split,
        m_blocks,
        splits,
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        IEEE=_ieee(hidden),
        GROUP_M=cfg.group_m,
        ENTROPY=bool(entropy),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    pm, ps, pt = part[0], part[1], part[2]
    mx = pm.max(dim=0).values
    f = torch.exp(pm - mx)
    s = (ps * f).sum(dim=0)
    lse = mx + torch.log(s)
    logp = pt.sum(dim=0) - lse  # exactly one split holds each target column; the others added 0
    if not entropy:
        return logp, lse
    u = ((part[3] + (pm - mx) * ps) * f).sum(dim=0)  # every split's u rescaled to the row max
    return logp, lse, torch.log(s) - u / s


def _ieee(hidden: torch.Tensor) -> bool:
    """fp32 dot in IEEE precision (no TF32) for fp32 inputs, and always under the CPU interpreter, whose bf16 tl.dot
    returns garbage in triton 3.9 (the bf16 tile is upcast there; on a GPU bf16 tiles go to the tensor cores)."""
    return hidden.dtype == torch.float32 or hidden.device.type != "cuda"


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, accumulated in fp32 (cuBLAS out_dtype when available; on CPU by upcasting)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: bf16 GEMM (fp32 accumulation inside, bf16 result)
            return (a @ b).float()
    return a.float() @ b.float()


@torch.no_grad()
def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float = 1.0,
    *,
    config: TileConfig | None = None,
    dentropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [M, H] in hidden's dtype, dW [V, H] in weight's dtype) for d loss / d logp = grad_logp (fp32 [M]) and,
    when given, d loss / d entropy = dentropy (fp32 [M], with `entropy` the forward's entropy output).

    Rows whose grad_logp and dentropy are 0 (clipped tokens, for example) are dropped before any GEMM.
    """
    m, v, h = _check(hidden, weight, targets)
    if (dentropy is None) != (entropy is None):
        raise ValueError("dentropy and entropy must be given together (or neither)")
    dev = hidden.device
    dx = torch.zeros(m, h, dtype=hidden.dtype, device=dev)
    dw = torch.zeros(v, h, dtype=weight.dtype, device=dev)
    if m == 0:
        return dx, dw
    active = grad_logp != 0
    if dentropy is not None:
        active = active | (dentropy != 0)
    live = torch.nonzero(active).squeeze(1)
    if live.numel() == 0:
        return dx, dw
    full = live.numel() == m

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous() if full else t.index_select(0, live).contiguous()

    x = rows(hidden)
    tg = rows(targets)
    ls = rows(lse.float())
    gg = rows(grad_logp.float())
    has_ent = dentropy is not None
    de = rows(dentropy.float()) if has_ent else gg  # dummy pointers without the entropy term (never read)
    en = rows(entropy.float()) if has_ent else gg
    weight = weight.contiguous()
    ml = x.shape[0]
    cfg = config or default_config(hidden.dtype, dev)
    vc = max(cfg.bn, (cfg.chunk_bytes // max(1, ml * x.element_size())) // cfg.bn * cfg.bn)
    vc = min(vc, triton.cdiv(v, cfg.bn) * cfg.bn)
    chunk = torch.empty(ml, vc, dtype=hidden.dtype, device=dev)
    dx_acc = torch.zeros(ml, h, dtype=torch.float32, device=dev)
    inv_t = 1.0 / float(temperature)
    for v_lo in range(0, v, vc):
        v_hi = min(v, v_lo + vc)
        width = v_hi - v_lo
        m_blocks, n_blocks = triton.cdiv(ml, cfg.bm), triton.cdiv(width, cfg.bn)
        _dlogits_kernel[(m_blocks * n_blocks,)](
            x,
            weight,
            tg,
            ls,
            gg,
            de,
            en,
            chunk,
            ml,
            h,
            x.stride(0),
            weight.stride(0),
            chunk.stride(0),
            v_lo,
            v_hi,
            inv_t,
            m_blocks,
            n_blocks,
            BM=cfg.bm,
            BN=cfg.bn,
            BK=cfg.bk,
            IEEE=_ieee(hidden),
            GROUP_M=cfg.group_m,
            HAS_ENT=has_ent,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        g = chunk[:, :width]
        torch.mm(g.t(), x, out=dw[v_lo:v_hi])  # one GEMM over all live tokens: fp32 accumulation, written once
        dx_acc += _mm_f32(g, weight[v_lo:v_hi])
    if full:
        dx.copy_(dx_acc)
    else:
        dx.index_copy_(0, live, dx_acc.to(dx.dtype))
    return dx, dw
