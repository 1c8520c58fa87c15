"""`torch.ops.r1engine.decode_step` / `FusedDecodeStep` (one C++ call per decode step) against the eager forward
with a KV cache: the same logits and cache contents bit for bit, the same generations, and clear errors."""

from __future__ import annotations

import pytest
import torch

from r1engine import _ext
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.models import decode_step as decode_step_module
from r1engine.models import kv_cache as kv_cache_module
from r1engine.models.decode_step import FusedDecodeStep, decode_weights
from r1engine.models.kv_cache import KVCache
from r1engine.models.policy import fused_layer_ops
from r1engine.rollout.native_engine import NativeEngine

pytestmark = pytest.mark.skipif(not _ext.has_op("decode_step"), reason="compiled extension not built")

CONFIGS = {
    "gqa": dict(vocab_size=37, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80),
    "mha_odd_head_dim": dict(
        vocab_size=23, hidden_size=40, num_layers=1, num_heads=4, num_kv_heads=4, intermediate_size=24
    ),
    "one_kv_head": dict(vocab_size=50, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, intermediate_size=96),
}


def _model(name: str, dtype: torch.dtype, seed: int = 0) -> PolicyModel:
    model = PolicyModel(PolicyConfig(max_position_embeddings=64, **CONFIGS[name]))
    model.reset_parameters(seed)
    with torch.no_grad():  # biases and norms away from their init values, so a mixed-up slot shows
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(dtype).eval().requires_grad_(False)


def _caches(model: PolicyModel, lengths: list[int], cache_len: int, seed: int) -> tuple[KVCache, KVCache]:
    """Two identical caches holding random committed keys/values with ragged `lengths`."""
    cfg = model.config
    a = KVCache(cfg.num_layers, len(lengths), cache_len, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype)
    gen = torch.Generator().manual_seed(seed)
    a.k.copy_(torch.randn(a.k.shape, generator=gen))
    a.v.copy_(torch.randn(a.v.shape, generator=gen))
    a.advance(torch.tensor(lengths))
    b = KVCache(cfg.num_layers, len(lengths), cache_len, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype)
    b.k.copy_(a.k), b.v.copy_(a.v), b.advance(torch.tensor(lengths))
    return a, b


def _eager_logits(model: PolicyModel, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    """The eager forward's next-token logits, its layers one Python module at a time (no fused operator)."""
    previous, decode_step_module.USE_FUSED_DECODE_STEP = decode_step_module.USE_FUSED_DECODE_STEP, False
    try:
        return model.logits(model(tokens[:, None], position_ids=positions, kv_cache=cache).hidden[:, 0])
    finally:
        decode_step_module.USE_FUSED_DECODE_STEP = previous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_equals_the_eager_forward_bitwise(name, dtype):
    model = _model(name, dtype)
    lengths = [0, 5, 1, 17, 8, 30, 3]  # a row with an empty cache, one at the last slot but one
    fused_cache, eager_cache = _caches(model, lengths, cache_len=31, seed=7)
    tokens = torch.randint(0, model.config.vocab_size, (len(lengths),), generator=torch.Generator().manual_seed(1))
    step = FusedDecodeStep.build(model, fused_cache)
    assert step is not None
    with torch.no_grad():
        got = step(tokens, fused_cache)
        want = _eager_logits(model, tokens, eager_cache, eager_cache.lengths[:, None])
    assert got.dtype == dtype and got.shape == (len(lengths), model.config.vocab_size)
    assert torch.equal(got, want)
    assert torch.equal(fused_cache.k, eager_cache.k) and torch.equal(fused_cache.v, eager_cache.v)
    assert torch.equal(fused_cache.lengths, torch.tensor(lengths))  # committing is the caller's


def test_positions_past_the_table_are_capped_as_the_engine_does():
    """Rows beyond max_position_embeddings rotate at the last position (what the engine's eager steps pass)."""
    model = _model("gqa", torch.float32)
    cap = model.config.max_position_embeddings - 1
    lengths = [cap - 1, cap, cap + 3]
    fused_cache, eager_cache = _caches(model, lengths, cache_len=cap + 8, seed=2)
    tokens = torch.tensor([3, 4, 5])
    with torch.no_grad():
        got = FusedDecodeStep.build(model, fused_cache)(tokens, fused_cache)
        want = _eager_logits(model, tokens, eager_cache, eager_cache.lengths[:, None].clamp(max=cap))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_per_row", [1, 2, 5])
def test_layers_over_several_tokens_match_the_eager_layers(tokens_per_row, dtype, monkeypatch):
    """`decoder_layers` (what a cached forward of up to MAX_DECODE_TOKENS tokens per row runs, e.g. a speculative
    verify) against the eager layers: bitwise for one token, within rounding for several (the eager layers attend
    through SDPA there), the same keys and values written either way."""
    model = _model("gqa", dtype, seed=5)
    lengths = [0, 9, 3, 20]
    fused_cache, eager_cache = _caches(model, lengths, cache_len=27, seed=4)
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), tokens_per_row), generator=torch.Generator())
    with torch.no_grad():
        got = model(ids, kv_cache=fused_cache)
        assert decode_step_module.decoder_layers_apply(model.model.embed_tokens(ids), fused_cache)
        monkeypatch.setattr(decode_step_module, "USE_FUSED_DECODE_STEP", False)
        want = model(ids, kv_cache=eager_cache)
    tol = dict(rtol=0, atol=0) if tokens_per_row == 1 else dict(rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16 and tokens_per_row > 1:
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.last_hidden, want.last_hidden, **tol)
    torch.testing.assert_close(got.logits, want.logits, **tol)
    # the first layer writes the same keys and values; later layers' inputs carry the attention's rounding
    assert torch.equal(fused_cache.k[0], eager_cache.k[0]) and torch.equal(fused_cache.v[0], eager_cache.v[0])
    torch.testing.assert_close(fused_cache.k, eager_cache.k, **tol)
    torch.testing.assert_close(fused_cache.v, eager_cache.v, **tol)


def test_mtp_layer_decodes_through_the_fused_layers(monkeypatch):
    """The MTP layer with its one-layer cache (speculative drafting) takes `decoder_layers` too."""
    model = PolicyModel(PolicyConfig(max_position_embeddings=64, num_mtp_layers=1, **CONFIGS["gqa"]))
    model.reset_parameters(9)
    model = model.eval().requires_grad_(False)
    cfg = model.config
    caches = []
    for _ in range(2):
        cache = KVCache(1, 3, 16, cfg.num_kv_heads, cfg.head_dim)
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(2)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(3)))
        cache.advance(torch.tensor([4, 0, 9]))
        caches.append(cache)
    hidden = torch.randn(3, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    nxt = torch.tensor([[3, 4], [5, 6], [7, 8]])
    calls = []
    layers = decode_step_module.decoder_layers
    monkeypatch.setattr(decode_step_module, "decoder_layers", lambda *a: (calls.append(1), layers(*a))[1])
    with torch.no_grad():
        got = model.mtp_hidden(
            hidden, nxt, position_ids=caches[0].lengths[:, None] + torch.arange(2), kv_cache=caches[0]
        )
        assert calls == [1]
        monkeypatch.setattr(decode_step_module, "USE_FUSED_DECODE_STEP", False)
        want = model.mtp_hidden(
            hidden, nxt, position_ids=caches[1].lengths[:, None] + torch.arange(2), kv_cache=caches[1]
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].k, caches[1].k)


def test_prefill_sized_forwards_keep_the_eager_layers():
    model = _model("gqa", torch.float32)
    cache, _ = _caches(model, [0, 0], cache_len=20, seed=0)
    most = decode_step_module.MAX_DECODE_TOKENS
    x = torch.zeros(2, most, model.config.hidden_size)
    with torch.no_grad():
        assert decode_step_module.decoder_layers_apply(x, cache)
        assert not decode_step_module.decoder_layers_apply(torch.zeros(2, most + 1, model.config.hidden_size), cache)
    assert not decode_step_module.decoder_layers_apply(x, cache)  # autograd on: training-style forwards stay eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generations_with_and_without_the_fused_step_are_identical(dtype, monkeypatch):
    model = _model("gqa", dtype, seed=3)
    engine = NativeEngine(model)
    # prompts longer than a decode step, so that the prefill takes the eager layers in both runs (see below for
    # the fused layers over several tokens)
    prompts = [[1, 5, 9, *range(10, 20)], [1, 7, *range(3, 12)], [1, 3, 3, 3, 8, 22, *range(4, 9)]]
    kwargs = dict(n=4, max_new_tokens=20, temperature=1.0, stop_token_ids=[2], seed=11)
    fused = engine.generate(prompts, **kwargs)
    monkeypatch.setattr(decode_step_module, "USE_FUSED_DECODE_STEP", False)
    eager = engine.generate(prompts, **kwargs)
    assert fused.completion_ids == eager.completion_ids
    assert fused.finish_reason == eager.finish_reason
    assert all(torch.equal(a, b) for a, b in zip(fused.logprobs, eager.logprobs, strict=True))
    assert any(r == "stop" for r in fused.finish_reason) and any(r == "length" for r in fused.finish_reason)


def test_build_declines_where_the_eager_path_differs(monkeypatch):
    model = _model("gqa", torch.float32)
    cache, _ = _caches(model, [1, 2], cache_len=8, seed=0)
    assert FusedDecodeStep.build(model, cache) is not None
    with fused_layer_ops(False):  # eager layers on the op-by-op references: the fused kernels would not match
        assert FusedDecodeStep.build(model, cache) is None
    monkeypatch.setattr(kv_cache_module, "USE_DECODE_KERNEL", False)  # eager attention through SDPA
    assert FusedDecodeStep.build(model, cache) is None
    monkeypatch.undo()
    model64 = _model("gqa", torch.float64)
    cache64, _ = _caches(model64, [1, 2], cache_len=8, seed=0)
    assert FusedDecodeStep.build(model64, cache64) is None
    monkeypatch.setattr(decode_step_module, "USE_FUSED_DECODE_STEP", False)
    assert FusedDecodeStep.build(model, cache) is None


def test_bad_inputs_name_the_argument():
    model = _model("gqa", torch.float32)
    cfg = model.config
    cache, _ = _caches(model, [1, 7], cache_len=8, seed=0)
    weights = decode_weights(model)
    cos = sin = torch.zeros(2, cfg.head_dim)
    ids, op = torch.tensor([1, 2]), torch.ops.r1engine.decode_step

    def call(**changes):
        a = dict(ids=ids, cos=cos, sin=sin, k=cache.k, v=cache.v, lengths=cache.lengths, weights=weights) | changes
        return op(a["ids"], a["cos"], a["sin"], a["k"], a["v"], a["lengths"], a["weights"], cfg.num_heads, 1e-6)

    with pytest.raises(RuntimeError, match=r"weights: expected 27 tensors \(12 per layer for 2 layers"):
        call(weights=weights[:-1])
    with pytest.raises(RuntimeError, match=r"weights\[1\]: expected shape \[48, 48\]"):
        call(weights=[weights[0], weights[3], *weights[2:]])
    with pytest.raises(
        RuntimeError,
        match=r"lengths\[1\] = 8: the 1 new token\(s\) must fit in slots \[0, cache_len=8\) \(KVCache overflow\)",
    ):
        call(lengths=torch.tensor([1, 8]))
    with pytest.raises(RuntimeError, match=r"cos: expected float32 CPU with 2 rows of 8"):
        call(cos=torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"ids: expected int64 CPU \[2\]"):
        call(ids=ids.int())
    with pytest.raises(RuntimeError, match=r"weights\[0\]: expected dtype BFloat16 \(as the KV cache\), got Float"):
        call(k=cache.k.bfloat16(), v=cache.v.bfloat16())
