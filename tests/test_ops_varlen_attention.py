"""`r1engine.ops.varlen_attention` (C++ CPU kernel, backend "cpu" of r1engine.packing.attention) against the
per-sequence float32 reference: forward, lse and gradients over odd shapes (lengths 1..257 with empty sequences,
GQA groups 1/3/8, head dims 32/64/24/20), fp32 and bf16, causal and not; a sequence long enough for row blocks;
non-contiguous inputs; deterministic backward (repeat and thread count); torch.compile(fullgraph=True); errors."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

from r1engine.ops.varlen_attention import varlen_attention, varlen_attention_reference

LENGTHS = [1, 0, 2, 7, 33, 0, 64, 100, 257]  # empty sequences in cu_seqlens, 1 and 2 around the tile edges
HEADS = [(6, 2), (4, 4), (8, 1)]
HEAD_DIMS = [32, 64, 24, 20]  # 24: a 16- and an 8-lane column tile; 20: zero-padded lanes


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _qkv(total, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _run(fn, q, k, v, dout):
    """Output and (dq, dk, dv) of fn for the upstream gradient dout."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_forward_and_gradients_match_reference(heads, d, dtype, causal):
    hq, hkv = heads
    cu = _cu(LENGTHS)
    total = int(cu[-1])
    q, k, v = _qkv(total, hq, hkv, d, dtype, seed=hq * 100 + d + causal)
    dout = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(d))
    scale = 0.7 / math.sqrt(d)
    out, grads = _run(lambda *a: varlen_attention(*a, cu, causal=causal, scale=scale), q, k, v, dout)
    # the oracle in fp32 on the same (for bf16: already rounded) input values
    ref, ref_grads = _run(
        lambda *a: varlen_attention_reference(*a, cu, causal=causal, scale=scale), q.float(), k.float(), v.float(), dout
    )
    assert out.shape == (total, hq, d) and out.dtype == dtype
    assert all(g.dtype == dtype and g.shape == t.shape for g, t in zip(grads, (q, k, v), strict=True))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    gtol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want, **gtol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_is_the_log_sum_exp_of_the_scaled_scores(causal):
    lengths = [5, 0, 40, 1]
    cu = _cu(lengths)
    q, k, v = _qkv(46, 4, 2, 16, torch.float32, seed=3)
    out, lse = torch.ops.r1engine.varlen_attention_fwd(q, k, v, cu, 0.25, causal)
    assert lse.shape == (46, 4) and lse.dtype == torch.float32
    for a, b in itertools.pairwise(cu.tolist()):
        if b == a:
            continue
        s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b].repeat_interleave(2, 1)) * 0.25
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse[a:b], s.logsumexp(-1).T, atol=1e-5, rtol=1e-5)


def test_long_sequence_in_row_blocks():
    """600 tokens: the 600 x 600 score block is over the kernel's budget, so query rows go in blocks (dK and dV
    summed across blocks)."""
    lengths = [3, 600, 9]
    cu = _cu(lengths)
    q, k, v = _qkv(612, 2, 1, 16, torch.float32, seed=4)
    dout = torch.randn(612, 2, 16, generator=torch.Generator().manual_seed(5))
    for causal in (True, False):
        out, grads = _run(lambda *a, c=causal: varlen_attention(*a, cu, causal=c), q, k, v, dout)
        ref, ref_grads = _run(lambda *a, c=causal: varlen_attention_reference(*a, cu, causal=c), q, k, v, dout)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_non_contiguous_inputs():
    """q, k, v as column slices of one fused projection [total, Hq + 2 Hkv, D] (copied to contiguous)."""
    cu = _cu([11, 30, 4])
    qkv = torch.randn(45, 6 + 2 * 2, 32, generator=torch.Generator().manual_seed(6))
    q, k, v = qkv[:, :6], qkv[:, 6:8], qkv[:, 8:]
    assert not q.is_contiguous()
    dout = torch.randn(45, 6, 32, generator=torch.Generator().manual_seed(7))
    out, grads = _run(lambda *a: varlen_attention(*a, cu), q, k, v, dout)
    ref, ref_grads = _run(lambda *a: varlen_attention_reference(*a, cu), q, k, v, dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_no_grad_fast_path_equals_the_operator():
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), 6, 2, 32, torch.float32, seed=8)
    with torch.no_grad():
        direct = varlen_attention(q, k, v, cu)
    traced = varlen_attention(q.requires_grad_(), k, v, cu)
    assert traced.requires_grad
    torch.testing.assert_close(direct, traced.detach(), atol=0, rtol=0)


def test_backward_is_deterministic_across_calls_and_threads():
    cu = _cu(LENGTHS * 2)
    total = int(cu[-1])
    q, k, v = _qkv(total, 6, 2, 32, torch.float32, seed=9)
    dout = torch.randn(total, 6, 32, generator=torch.Generator().manual_seed(10))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 1, 2):
            torch.set_num_threads(n)
            results.append(_run(lambda *a: varlen_attention(*a, cu), q, k, v, dout))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=0, rtol=0)
        for got, want in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_all_sequences_empty_or_no_tokens():
    q, k, v = _qkv(0, 4, 2, 8, torch.float32, seed=11)
    out = varlen_attention(q.requires_grad_(), k, v, torch.tensor([0, 0, 0], dtype=torch.int32))
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    cu = _cu([9, 0, 23, 1])
    q, k, v = _qkv(33, 6, 2, 16, torch.float32, seed=12)

    def f(q, k, v, cu):
        return (varlen_attention(q * 2, k, v, cu, causal=True) ** 2).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(f, fullgraph=True)(*leaves, cu)
    grads = torch.autograd.grad(out, leaves)
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    out_e = f(*leaves_e, cu)
    grads_e = torch.autograd.grad(out_e, leaves_e)
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge)


def test_eager_calls_do_not_load_the_compiler():
    script = """
import sys, torch
from r1engine.ops.varlen_attention import varlen_attention
q, k, v = torch.randn(10, 4, 8, requires_grad=True), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
varlen_attention(q, k, v, torch.tensor([0, 3, 10], dtype=torch.int32)).sum().backward()
assert q.grad is not None
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(10, 4, 2, 8, torch.float32, seed=13)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"q: expected float32 or bfloat16, got torch.float64"):
        varlen_attention(q.double(), k.double(), v.double(), cu)
    with pytest.raises(TypeError, match=r"q, k, v: expected one dtype"):
        varlen_attention(q, k.bfloat16(), v, cu)
    with pytest.raises(ValueError, match=r"q: expected a tensor \[total, heads, head_dim\], got \[10, 32\]"):
        varlen_attention(q.flatten(1), k, v, cu)
    with pytest.raises(ValueError, match=r"q_heads \(4\) must be a multiple of kv_heads \(3\)"):
        varlen_attention(q, *_qkv(10, 3, 3, 8, torch.float32, seed=1)[1:], cu)
    with pytest.raises(ValueError, match=r"v: expected the shape of k \[10, 2, 8\], got \[10, 2, 4\]"):
        varlen_attention(q, k, v[..., :4], cu)
    with pytest.raises(ValueError, match=r"k: expected \[10, kv_heads, 8\]"):
        varlen_attention(q, k[:9], v[:9], cu)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected int32 \[num_seqs \+ 1\], got torch.int64"):
        varlen_attention(q, k, v, cu.long())
    with pytest.raises(ValueError, match=r"cu_seqlens: expected to rise from 0 to total=10, got 0 \.\.\. 12"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing values, got 6 then 4 at index 1"):
        varlen_attention(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    # the C++ operators check their arguments too
    with pytest.raises(RuntimeError, match=r"k: expected \[total, kv_heads, head_dim\], got shape \[10, 16\]"):
        torch.ops.r1engine.varlen_attention_fwd(q, k.flatten(1), v, cu, 1.0, True)
    out, lse = torch.ops.r1engine.varlen_attention_fwd(q, k, v, cu, 1.0, True)
    with pytest.raises(RuntimeError, match=r"lse: expected float32 \[10, 4\] on CPU, got Float \[10, 3\]"):
        torch.ops.r1engine.varlen_attention_bwd(out, q, k, v, out, lse[:, :3], cu, 1.0, True)
    with pytest.raises(RuntimeError, match=r"dout: expected Float \[10, 4, 8\]"):
        torch.ops.r1engine.varlen_attention_bwd(out.bfloat16(), q, k, v, out, lse, cu, 1.0, True)
