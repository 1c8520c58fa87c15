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
        out = model(tokens[:, None], position_ids=eager_cache.lengths[:, None], kv_cache=eager_cache)
        want = model.logits(out.hidden[:, 0])
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
        pos = eager_cache.lengths[:, None].clamp(max=cap)
        want = model.logits(model(tokens[:, None], position_ids=pos, kv_cache=eager_cache).hidden[:, 0])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generations_with_and_without_the_fused_step_are_identical(dtype, monkeypatch):
    model = _model("gqa", dtype, seed=3)
    engine = NativeEngine(model)
    prompts = [[1, 5, 9], [1, 7], [1, 3, 3, 3, 8, 2 + 20]]
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
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 8: the new token's slot must lie in \[0, cache_len=8\)"):
        call(lengths=torch.tensor([1, 8]))
    with pytest.raises(RuntimeError, match=r"cos: expected float32 CPU \[2, 8\]"):
        call(cos=torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"ids: expected int64 CPU \[2\]"):
        call(ids=ids.int())
    with pytest.raises(RuntimeError, match=r"weights\[0\]: expected dtype BFloat16 \(as the KV cache\), got Float"):
        call(k=cache.k.bfloat16(), v=cache.v.bfloat16())
