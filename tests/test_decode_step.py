"""`torch.ops.r1engine.decode_step` / `FusedDecodeStep` (one C++ call per decode step) against the eager forward
with a KV cache: the same logits and cache contents bit for bit, the same generations, and clear errors, for every
family the policy loads (Qwen2/MiMo, Llama with and without attention biases, Qwen3 with its q/k norm and a
head_dim other than hidden / heads)."""

from __future__ import annotations

import pytest
import torch

from r1engine import _ext, settings
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.models import decode_step as decode_step_module
from r1engine.models.decode_step import LAYER_SLOTS, FusedDecodeStep, decode_weights, layer_weights
from r1engine.models.kv_cache import KVCache
from r1engine.rollout.native_engine import NativeEngine

pytestmark = pytest.mark.skipif(not _ext.has_op("decode_step"), reason="compiled extension not built")

CONFIGS = {
    "gqa": dict(vocab_size=37, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80),
    "mha_odd_head_dim": dict(
        vocab_size=23, hidden_size=40, num_layers=1, num_heads=4, num_kv_heads=4, intermediate_size=24
    ),
    "one_kv_head": dict(vocab_size=50, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1, intermediate_size=96),
    # Llama: no bias anywhere (at::mm for every projection), GQA, scaled RoPE tables from Python
    "llama": dict(
        vocab_size=41, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=3, intermediate_size=72,
        qkv_bias=False, o_bias=False, architecture="LlamaForCausalLM",
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Llama with attention_bias: q/k/v and o_proj biases, odd sizes (head_dim 10, vocab 29)
    "llama_attention_bias": dict(
        vocab_size=29, hidden_size=40, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=56,
        qkv_bias=True, o_bias=True, architecture="LlamaForCausalLM",
    ),
    # Qwen3: q/k RMSNorm per head, head_dim 16 != hidden / heads = 12
    "qwen3": dict(
        vocab_size=37, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, head_dim=16,
        qkv_bias=False, o_bias=False, qk_norm=True, architecture="Qwen3ForCausalLM",
    ),
    # Qwen3 with attention_bias, one KV head for 3 query heads, head_dim 10 < hidden / heads = 12, odd sizes
    "qwen3_attention_bias_odd": dict(
        vocab_size=31, hidden_size=36, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=20, head_dim=10,
        qkv_bias=True, o_bias=True, qk_norm=True, architecture="Qwen3ForCausalLM",
    ),
}  # fmt: skip


def _model(name: str, dtype: torch.dtype, seed: int = 0, **overrides) -> PolicyModel:
    model = PolicyModel(PolicyConfig(max_position_embeddings=64, **CONFIGS[name] | overrides))
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
    with settings.override(fused_decode_step=False):
        return model.logits(model(tokens[:, None], position_ids=positions, kv_cache=cache).hidden[:, 0])


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
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layers_over_several_tokens_match_the_eager_layers(name, tokens_per_row, dtype):
    """`decoder_layers` (what a cached forward of up to MAX_DECODE_TOKENS tokens per row runs, e.g. a speculative
    verify) against the eager layers: bitwise for one token, within rounding for several (the eager layers attend
    through SDPA there), the same keys and values written either way."""
    model = _model(name, dtype, seed=5)
    lengths = [0, 9, 3, 20]
    fused_cache, eager_cache = _caches(model, lengths, cache_len=27, seed=4)
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), tokens_per_row), generator=torch.Generator())
    with torch.no_grad():
        got = model(ids, kv_cache=fused_cache)
        assert decode_step_module.decoder_layers_apply(model.model.embed_tokens(ids), fused_cache)
        with settings.override(fused_decode_step=False):
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


@pytest.mark.parametrize("name", ["gqa", "qwen3", "llama_attention_bias"])
def test_mtp_layer_decodes_through_the_fused_layers(name, monkeypatch):
    """The MTP layer with its one-layer cache (speculative drafting) takes `decoder_layers` too."""
    model = _model(name, torch.float32, seed=9, num_mtp_layers=1)
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
        with settings.override(fused_decode_step=False):
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
@pytest.mark.parametrize("name", ["gqa", "llama", "llama_attention_bias", "qwen3", "qwen3_attention_bias_odd"])
def test_generations_with_and_without_the_fused_step_are_identical(name, dtype):
    model = _model(name, dtype, seed=3)
    engine = NativeEngine(model)
    # prompts longer than a decode step, so that the prefill takes the eager layers in both runs (see below for
    # the fused layers over several tokens)
    prompts = [[1, 5, 9, *range(10, 20)], [1, 7, *range(3, 12)], [1, 3, 3, 3, 8, 22, *range(4, 9)]]
    kwargs = dict(n=4, max_new_tokens=20, temperature=1.0, stop_token_ids=[2], seed=11)
    fused = engine.generate(prompts, **kwargs)
    with settings.override(fused_decode_step=False):
        eager = engine.generate(prompts, **kwargs)
    assert fused.completion_ids == eager.completion_ids
    assert fused.finish_reason == eager.finish_reason
    assert all(torch.equal(a, b) for a, b in zip(fused.logprobs, eager.logprobs, strict=True))
    assert any(r == "stop" for r in fused.finish_reason) and any(r == "length" for r in fused.finish_reason)


def test_build_declines_where_the_eager_path_differs():
    model = _model("gqa", torch.float32)
    cache, _ = _caches(model, [1, 2], cache_len=8, seed=0)
    assert FusedDecodeStep.build(model, cache) is not None
    # eager layers on the op-by-op references: the fused kernels would not match
    with settings.override(fused_layer_ops=False):
        assert FusedDecodeStep.build(model, cache) is None
    with settings.override(decode_attention_kernel=False):  # eager attention through SDPA
        assert FusedDecodeStep.build(model, cache) is None
    model64 = _model("gqa", torch.float64)
    cache64, _ = _caches(model64, [1, 2], cache_len=8, seed=0)
    assert FusedDecodeStep.build(model64, cache64) is None
    with settings.override(fused_decode_step=False):
        assert FusedDecodeStep.build(model, cache) is None
    assert FusedDecodeStep.build(model, cache) is not None  # nothing stays switched off after the blocks


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

    with pytest.raises(RuntimeError, match=r"weights: expected 33 tensors \(15 per layer for 2 layers"):
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


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_weights_follow_the_slot_layout(name):
    """Slot i of every layer is the parameter LAYER_SLOTS[i] names, or the cached empty tensor where the family has
    no such piece (the same object every call: building the list stays cheap)."""
    model = _model(name, torch.bfloat16)
    weights = layer_weights(model.model.layers)
    assert len(LAYER_SLOTS) == 15 and len(weights) == len(LAYER_SLOTS) * model.config.num_layers
    params = dict(model.named_parameters())
    for i, w in enumerate(weights):
        layer, slot = divmod(i, len(LAYER_SLOTS))
        key = f"model.layers.{layer}.{LAYER_SLOTS[slot].rstrip('?')}"
        if key in params:
            assert w is params[key], key
        else:
            assert LAYER_SLOTS[slot].endswith("?") and w.numel() == 0 and w.dtype == torch.bfloat16, key
            assert w is layer_weights(model.model.layers)[i]
    present = {name for name in params if name.startswith("model.layers.")}
    assert len(present) == sum(w.numel() > 0 for w in weights)  # nothing left out


def test_eager_head_norm_equals_the_rows_of_the_kernel():
    """The eager q/k norm runs r1engine.ops.rms_norm on [b, t, heads, D]; the operators run the kernel over the rows
    of [b*t*heads, D]: the same bits."""
    from r1engine.ops.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 2, 5, 16, generator=gen).to(dtype)
        w = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype)
        with torch.no_grad():
            eager = rms_norm(x, w, 1e-6)
            rows = torch.ops.r1engine.rms_norm_fwd(x.reshape(-1, 16), w.float().contiguous(), 1e-6)[0]
        assert torch.equal(eager.reshape(-1, 16), rows)


def test_bad_optional_slots_name_the_slot():
    """A present optional piece of the wrong shape (or a required one left empty) names its slot and shape."""
    model = _model("qwen3", torch.float32)
    cfg = model.config
    cache, _ = _caches(model, [1, 7], cache_len=8, seed=0)
    weights = decode_weights(model)
    cos = sin = torch.zeros(2, cfg.head_dim)
    ids, op = torch.tensor([1, 2]), torch.ops.r1engine.decode_step

    def call(ws):
        return op(ids, cos, sin, cache.k, cache.v, cache.lengths, ws, cfg.num_heads, 1e-6)

    call(weights)  # the layout as built runs
    second = len(LAYER_SLOTS)  # layer 1's first slot
    q_norm, o_bias = second + LAYER_SLOTS.index("self_attn.q_norm.weight?"), LAYER_SLOTS.index("self_attn.o_proj.bias?")
    wrong = list(weights)
    wrong[q_norm] = torch.ones(cfg.hidden_size)  # the hidden-sized norm where the per-head one goes
    with pytest.raises(
        RuntimeError, match=rf"weights\[{q_norm}\]: expected shape \[16\] or an empty tensor \(absent\)"
    ):
        call(wrong)
    wrong = list(weights)
    wrong[o_bias] = torch.zeros(cfg.num_heads * cfg.head_dim)  # an o bias of the attention's width, not hidden's
    with pytest.raises(RuntimeError, match=rf"weights\[{o_bias}\]: expected shape \[48\] or an empty tensor"):
        call(wrong)
    wrong = list(weights)
    wrong[o_bias] = torch.zeros(cfg.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=rf"weights\[{o_bias}\]: expected dtype Float \(as the KV cache\)"):
        call(wrong)
    wrong = list(weights)
    wrong[1] = torch.empty(0)  # q_proj.weight is required
    with pytest.raises(RuntimeError, match=r"weights\[1\]: expected shape \[64, 48\], got \[0\]"):
        call(wrong)
    with pytest.raises(RuntimeError, match=r"weights\[1\]: expected shape \[48, 48\], got \[64, 48\]"):
        # head_dim from the cache (16): a cache of hidden / heads = 12 wide heads does not fit these weights
        small = KVCache(cfg.num_layers, 2, 8, cfg.num_kv_heads, 12)
        op(ids, torch.zeros(2, 12), torch.zeros(2, 12), small.k, small.v, small.lengths, weights, cfg.num_heads, 1e-6)
