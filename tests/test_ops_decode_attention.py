"""`torch.ops.r1engine.decode_attention` (the native engine's decode step) against SDPA with a ragged key mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1engine import _ext

pytestmark = pytest.mark.skipif(not _ext.has_op("decode_attention"), reason="compiled extension not built")


def _reference(q, k, v, n_keys):
    """q [B, Hq, D], k/v [B, Hkv, S, D]: each row attends to its first n_keys[b] keys (fp32 SDPA)."""
    b, hq, d = q.shape
    s = k.shape[2]
    mask = (torch.arange(s)[None, :] < n_keys[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.float(), v.float(), attn_mask=mask, enable_gqa=True)[
        :, :, 0
    ]
    return torch.where((n_keys > 0)[:, None, None], out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,head_dim,cache_len",
    [(64, 6, 2, 32, 81), (3, 4, 4, 7, 5), (5, 8, 1, 16, 33), (1, 2, 2, 64, 1), (7, 3, 1, 24, 9)],
)
def test_matches_masked_sdpa(batch, q_heads, kv_heads, head_dim, cache_len, dtype):
    g = torch.Generator().manual_seed(batch * 31 + head_dim)
    q = torch.randn(batch, q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, cache_len, head_dim, generator=g).to(dtype)
    n_keys = torch.randint(0, cache_len + 1, (batch,), generator=g)
    n_keys[0] = cache_len  # the full cache
    if batch > 2:
        n_keys[1], n_keys[2] = 0, 1
    got = torch.ops.r1engine.decode_attention(q, k, v, n_keys, head_dim**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), _reference(q, k, v, n_keys), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 24, 40, 7])
def test_key_counts_around_blocks_of_eight(head_dim, dtype):
    """Fixed-size (32, 64, 128), runtime-size (24, 40) and scalar (7) head dims; 0, 1 and 7-9 keys, the full cache."""
    g = torch.Generator().manual_seed(head_dim)
    n_keys = torch.tensor([0, 1, 7, 8, 9, 15, 16, 17, 95, 100])
    q = torch.randn(10, 6, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(10, 2, 100, head_dim, generator=g).to(dtype) for _ in range(2))
    got = torch.ops.r1engine.decode_attention(q, k, v, n_keys, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), _reference(q, k, v, n_keys), rtol=tol, atol=tol)
    assert torch.equal(got, torch.ops.r1engine.decode_attention(q, k, v, n_keys, head_dim**-0.5))  # deterministic


@pytest.mark.parametrize("q_heads,cache_len", [(2, 1200), (64, 200)])
def test_more_keys_than_one_chunk(q_heads, cache_len):
    """Past one chunk of keys (512 for up to 8 query heads per KV head, 64 for 64) the chunks merge (online softmax)."""
    g = torch.Generator().manual_seed(cache_len)
    q = torch.randn(3, q_heads, 32, generator=g)
    k, v = (torch.randn(3, 1, cache_len, 32, generator=g) for _ in range(2))
    n_keys = torch.tensor([cache_len, cache_len // 2 + 1, 65])
    got = torch.ops.r1engine.decode_attention(q, k, v, n_keys, 32**-0.5)
    torch.testing.assert_close(got, _reference(q, k, v, n_keys), rtol=1e-5, atol=1e-5)


def test_reads_a_strided_cache_layer():
    """The KV cache passes one layer of `[layers, B, Hkv, S, D]` and q as a view of `[B, 1, Hq, D]`."""
    g = torch.Generator().manual_seed(3)
    cache_k, cache_v = torch.randn(2, 4, 2, 10, 8, generator=g), torch.randn(2, 4, 2, 10, 8, generator=g)
    q = torch.randn(4, 1, 6, 8, generator=g)
    n_keys = torch.tensor([10, 3, 7, 1])
    got = torch.ops.r1engine.decode_attention(q[:, 0], cache_k[1], cache_v[1], n_keys, 8**-0.5)
    torch.testing.assert_close(got, _reference(q[:, 0], cache_k[1], cache_v[1], n_keys), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(2, 6, 8), torch.randn(2, 4, 5, 8)
    n = torch.tensor([5, 5])
    with pytest.raises(RuntimeError, match=r"q_heads \(6\) must be a multiple of kv_heads \(4\)"):
        torch.ops.r1engine.decode_attention(q, k, k, n, 1.0)
    k = torch.randn(2, 2, 5, 8)
    with pytest.raises(RuntimeError, match="n_keys: expected values <= cache_len=5, got 6"):
        torch.ops.r1engine.decode_attention(q, k, k, torch.tensor([6, 1]), 1.0)
    with pytest.raises(RuntimeError, match="n_keys: expected int64"):
        torch.ops.r1engine.decode_attention(q, k, k, n.int(), 1.0)
    with pytest.raises(RuntimeError, match="v: expected the shape of k"):
        torch.ops.r1engine.decode_attention(q, k, k[:, :, :4], n, 1.0)
    with pytest.raises(RuntimeError, match="expected one dtype"):
        torch.ops.r1engine.decode_attention(q, k.bfloat16(), k, n, 1.0)
