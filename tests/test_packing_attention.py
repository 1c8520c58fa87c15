"""Packed (varlen) attention equals per-sequence attention and never attends across sequence boundaries."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from r1engine import _ext
from r1engine.packing import collate, plan
from r1engine.packing.attention import (
    BucketCostModel,
    _sdpa_bucket,
    plan_length_buckets,
    varlen_attention,
    varlen_attention_reference,
)

BACKENDS = ["cpu", "sdpa_bucket", "sdpa_loop", "sdpa_mask"]  # "reference" is checked against the oracle below


def per_sequence_sdpa(q, k, v, lengths, causal=True, scale=None):
    """Independent oracle: plain SDPA on each sequence separately, float64."""
    outs, a = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs = q[a : a + n].double().transpose(0, 1)
        ks = k[a : a + n].double().transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[a : a + n].double().transpose(0, 1).repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
        a += n
    return torch.cat(outs)


def make_qkv(total, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_per_sequence_attention(backend, dtype, heads, causal) -> None:
    lengths = [1, 17, 5, 1, 33, 2, 9]  # includes length-1 sequences
    total = sum(lengths)
    q, k, v = make_qkv(total, heads[0], heads[1], 24, dtype, seed=hash((backend, heads, causal)) % 1000)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, backend=backend)
    ref = per_sequence_sdpa(q, k, v, lengths, causal=causal)
    assert out.shape == (total, heads[0], 24) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_leak_across_sequences_and_gradients(backend) -> None:
    lengths = [7, 1, 12, 4]
    cu = torch.tensor([0, 7, 8, 20, 24], dtype=torch.int32)
    q, k, v = (t.requires_grad_() for t in make_qkv(24, 4, 2, 16, torch.float32, seed=5))
    out = varlen_attention(q, k, v, cu, 12, backend=backend)
    # perturbing sequence 2's keys/values changes nothing outside sequence 2
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[8:20] += 3.0
    v2[8:20] -= 2.0
    out2 = varlen_attention(q.detach(), k2, v2, cu, 12, backend=backend)
    keep = torch.ones(24, dtype=torch.bool)
    keep[8:20] = False
    torch.testing.assert_close(out2[keep], out.detach()[keep], atol=0, rtol=0)
    assert not torch.allclose(out2[8:20], out.detach()[8:20])
    # gradients equal those of the per-sequence oracle
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    (per_sequence_sdpa(qd, kd, vd, lengths) * w.double()).sum().backward()
    for g, r in zip(grads, (qd.grad, kd.grad, vd.grad), strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_on_a_collated_chunk() -> None:
    """cu_seqlens from collate (padding tail as its own segment) drive the attention of a packed chunk."""
    lengths = [9, 4, 13, 6, 2]
    p = plan(lengths, 20, 1)
    b = collate(p, 0, [torch.arange(n) for n in lengths])
    q, k, v = make_qkv(20, 4, 2, 8, torch.float32, seed=9)
    for c in range(b.num_chunks):
        cu = b.cu_seqlens[c]
        out = varlen_attention(q, k, v, cu, b.max_seqlen[c])
        ref = per_sequence_sdpa(q, k, v, cu.diff().tolist())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_reference_agrees_with_oracle_scale() -> None:
    q, k, v = make_qkv(10, 2, 1, 8, torch.float32, seed=1)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = varlen_attention_reference(q, k, v, cu, 7, scale=0.3)
    torch.testing.assert_close(out.double(), per_sequence_sdpa(q, k, v, [3, 7], scale=0.3), atol=1e-5, rtol=1e-5)


def test_errors() -> None:
    q, k, v = make_qkv(10, 3, 2, 8, torch.float32, seed=2)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        varlen_attention(q, k, v, cu, 10)
    q, k, v = make_qkv(10, 4, 2, 8, torch.float32, seed=2)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu.long(), 10)
    with pytest.raises(ValueError, match="rise from 0 to total=10"):
        varlen_attention(q, k, v, torch.tensor([0, 12], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match=r"\[total, heads, head_dim\]"):
        varlen_attention(q[0], k, v, cu, 10)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, 10, backend="nope")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_matches_reference() -> None:
    lengths = [1, 130, 7, 64]
    q, k, v = (t.cuda() for t in make_qkv(sum(lengths), 8, 2, 64, torch.bfloat16, seed=3))
    cu = torch.tensor([0, 1, 131, 138, 202], dtype=torch.int32, device="cuda")
    out = varlen_attention(q, k, v, cu, 130)
    torch.testing.assert_close(
        out.double().cpu(), per_sequence_sdpa(q.cpu(), k.cpu(), v.cpu(), lengths), atol=2e-2, rtol=2e-2
    )


# ---- "sdpa_bucket": length buckets under a cost model -----------------------------------------------------------

ONE_BUCKET = BucketCostModel(call_us=1e9, row_us=0.0, score_us=1e-9)  # calls are all that cost: pad everything
ONE_PER_LENGTH = BucketCostModel(call_us=1e-9, row_us=1.0, score_us=1.0)  # padding is all that costs: no padding


def softmax_attention_fp64(q, k, v, lengths, causal=True):
    """Plain per-sequence softmax attention in float64 (explicit scores, mask, softmax), the oracle."""
    outs, a = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs = q[a : a + n].double().transpose(0, 1)
        ks = k[a : a + n].double().transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[a : a + n].double().transpose(0, 1).repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        a += n
    return torch.cat(outs)


def flat_collated_row(lengths: list[int], chunk_len: int) -> list[int]:
    """Segment lengths of the flat row the trainer passes: chunks back to back, each padded tail its own segment."""
    b = collate(plan(lengths, chunk_len, 1), 0, [torch.arange(n) for n in lengths])
    return b.cu_seqlens_flat()[0].diff().tolist()


ROWS = {
    # several chunks; length-1 sequences; a chunk holding one sequence (33 of 40); padded tails
    "collated": flat_collated_row([1, 17, 5, 1, 33, 2, 9, 17, 3, 1, 29, 6], 40),
    "one_sequence": [23],
    "all_length_one": [1, 1, 1, 1, 1],
    "mixed_long_short": [3, 130, 1, 7, 64, 7, 2],
}


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("model", [ONE_BUCKET, ONE_PER_LENGTH, None], ids=["one_bucket", "per_length", "calibrated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_bucket_forward_and_gradients_match_fp64_softmax(row, model, dtype, causal) -> None:
    lengths = ROWS[row]
    total = sum(lengths)
    cu = [0, *itertools.accumulate(lengths)]
    q, k, v = (t.requires_grad_() for t in make_qkv(total, 6, 2, 20, dtype, seed=len(lengths) + 7 * causal))
    out = _sdpa_bucket(q, k, v, cu, causal, 1 / math.sqrt(20), model)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * weight).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = softmax_attention_fp64(qd, kd, vd, lengths, causal)
    (ref * weight.double()).sum().backward()
    assert out.shape == (total, 6, 20) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad), strict=True):
        torch.testing.assert_close(got.double(), want, atol=2 * tol, rtol=2 * tol)


def test_auto_on_cpu_is_the_kernel_and_equals_bucket_and_loop() -> None:
    """Backend "auto" on CPU fp32/bf16 is the C++ kernel when the extension has it, else "sdpa_bucket"; all agree."""
    lengths = flat_collated_row([41, 67, 52, 44, 70, 58, 63, 49, 55, 60], 256)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    q, k, v = make_qkv(sum(lengths), 6, 2, 32, torch.float32, seed=11)
    auto = varlen_attention(q, k, v, cu, max(lengths))
    expected = "cpu" if _ext.has_op("varlen_attention_fwd") else "sdpa_bucket"
    torch.testing.assert_close(auto, varlen_attention(q, k, v, cu, max(lengths), backend=expected), atol=0, rtol=0)
    torch.testing.assert_close(auto, varlen_attention(q, k, v, cu, max(lengths), backend="sdpa_bucket"))
    torch.testing.assert_close(auto, varlen_attention(q, k, v, cu, max(lengths), backend="sdpa_loop"))
    # other dtypes fall back to the buckets
    qd, kd, vd = (t.double() for t in (q, k, v))
    torch.testing.assert_close(
        varlen_attention(qd, kd, vd, cu, max(lengths)),
        varlen_attention(qd, kd, vd, cu, max(lengths), backend="sdpa_bucket"),
        atol=0,
        rtol=0,
    )


def brute_force_cost(lengths, model, causal) -> float:
    """Cheapest split of the sorted distinct lengths into contiguous buckets, by enumerating every split."""
    distinct = sorted(set(lengths))
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        cost, first = 0.0, 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                num_seqs = sum(n in distinct[first : i + 1] for n in lengths)
                cost += model.cost(num_seqs, distinct[i], 6, 32, causal)
                first = i + 1
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_bucket_plan_is_optimal_under_its_cost_model(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (int(torch.randint(1, 11, (1,), generator=g)),), generator=g).tolist()
    model = BucketCostModel(call_us=100.0 * (seed + 1), row_us=1e-3, score_us=1e-4)
    for causal in (True, False):
        ranges = plan_length_buckets(lengths, 6, 32, causal, model)
        distinct = sorted(set(lengths))
        assert [r[0] for r in ranges] == [0] + [r[1] + 1 for r in ranges[:-1]] and ranges[-1][1] == len(distinct) - 1
        cost = sum(
            model.cost(sum(n in distinct[a : b + 1] for n in lengths), distinct[b], 6, 32, causal) for a, b in ranges
        )
        assert cost == pytest.approx(brute_force_cost(lengths, model, causal))


def test_bucket_plan_extremes() -> None:
    lengths = [5, 9, 9, 200, 1, 5]
    assert plan_length_buckets(lengths, 6, 32, True, ONE_BUCKET) == [(0, 3)]
    assert plan_length_buckets(lengths, 6, 32, True, ONE_PER_LENGTH) == [(i, i) for i in range(4)]
