"""PolicyModel: packed vs unpacked equality, KV-cache decoding, MTP loss gradients, checkpoints, tokenizer, errors."""

from __future__ import annotations

import json

import pytest
import torch

import r1engine.packing.attention as attention
from r1engine import _ext, settings
from r1engine.models import KVCache, PolicyConfig, PolicyModel, build_char_tokenizer
from r1engine.models.tokenizer import load_tokenizer
from r1engine.ops.varlen_attention import varlen_attention_reference


def _model(seed: int = 0, **over) -> PolicyModel:
    torch.manual_seed(seed)
    m = PolicyModel(PolicyConfig.tiny(**over))
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1)[..., :-1, :].gather(-1, ids[..., 1:, None]).squeeze(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_packed_logprobs_equal_unpacked(dtype, tol):
    m = _model().to(dtype)
    lens = [7, 1, 13, 4]
    seqs = [torch.randint(0, m.config.vocab_size, (n,)) for n in lens]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = m(packed, cu_seqlens=cu, max_seqlen=max(lens))
    # position ids derived from cu_seqlens must equal explicit restarting ones
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out2 = m(packed, position_ids=pos, cu_seqlens=cu)
    torch.testing.assert_close(out.logits, out2.logits)
    for s, e, seq in zip(cu[:-1].tolist(), cu[1:].tolist(), seqs, strict=True):
        ref = m(seq[None]).logits[0]
        got = out.logits[0, s:e]
        if len(seq) > 1:
            assert (_token_logprobs(got, seq) - _token_logprobs(ref, seq)).abs().max().item() <= tol
        assert (got.float() - ref.float()).abs().max().item() <= tol * 10


def test_reference_varlen_matches_dense_block_mask():
    torch.manual_seed(1)
    lens = [5, 3, 9]
    total = sum(lens)
    q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)
    cu = torch.tensor([0, 5, 8, 17], dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    idx = torch.arange(total)
    mask = (seg[:, None] == seg[None]) & (idx[None] <= idx[:, None])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask,
    ).transpose(0, 1)
    torch.testing.assert_close(varlen_attention_reference(q, k, v, cu, 9), ref, atol=1e-5, rtol=1e-5)


def test_packed_forward_takes_the_attention_backend_of_the_settings(monkeypatch):
    """Packed rows attend through r1engine.packing.attention.varlen_attention with `settings.attention_backend`:
    every backend gives the same logits, and the one in effect is the one called."""
    m = _model(4)
    lens = [6, 1, 11]
    ids = torch.randint(0, m.config.vocab_size, (1, sum(lens)))
    cu = torch.tensor([0, 6, 7, 18], dtype=torch.int32)
    with torch.no_grad():
        want = m(ids, cu_seqlens=cu).logits
        built = ("cpp",) if _ext.has_op("varlen_attention_fwd") else ()
        for backend in ("reference", "sdpa_bucket", "sdpa_loop", *built):
            with settings.override(attention_backend=backend):
                torch.testing.assert_close(m(ids, cu_seqlens=cu).logits, want, atol=1e-5, rtol=1e-5)
        seen = []
        monkeypatch.setattr(attention, "_sdpa_loop", lambda *a, **k: seen.append(1) or torch.zeros_like(a[0]))
        with settings.override(attention_backend="sdpa_loop"):
            m(ids, cu_seqlens=cu)
        assert len(seen) == m.config.num_layers
        with settings.override(attention_backend="nope"), pytest.raises(ValueError, match="for varlen_attention"):
            m(ids, cu_seqlens=cu)


def test_kv_cache_incremental_equals_full_forward():
    m = _model(2)
    cfg = m.config
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in (6, 3, 9)]
    conts = [torch.randint(0, cfg.vocab_size, (5,)) for _ in prompts]
    cache = KVCache(cfg.num_layers, 3, 32, cfg.num_kv_heads, cfg.head_dim)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    with torch.no_grad():
        m(ids, kv_cache=cache)
        cache.advance(torch.tensor([len(p) for p in prompts]))
        step_logits = []
        for t in range(0, 5, 2):  # chunks of 2 then 1 tokens (like speculative verification)
            chunk = torch.stack([c[t : t + 2] for c in conts])
            step_logits.append(m(chunk, kv_cache=cache).logits)
            cache.advance(chunk.shape[1])
        inc = torch.cat(step_logits, 1)
        for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
            full = m(torch.cat([p, c])[None]).logits[0, len(p) :]
            torch.testing.assert_close(inc[i], full, atol=1e-5, rtol=1e-4)


def test_mtp_loss_gradient_flows_and_detach():
    m = _model(3)
    ids = torch.randint(0, m.config.vocab_size, (3, 11))
    out = m(ids)
    loss = m.mtp_loss(ids, out.last_hidden, lam=0.3)
    assert loss.item() > 0 and torch.isfinite(loss)
    loss.backward()
    mtp = m.model.mtp_layers[0]
    for p in (mtp.input_proj.weight, mtp.self_attn.q_proj.weight, mtp.mlp.down_proj.weight, mtp.token_layernorm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # default detach_main=True: the policy's own parameters are not moved by the draft-head loss
    assert m.model.layers[0].mlp.up_proj.weight.grad is None
    assert m.lm_head.weight.grad is None and m.model.embed_tokens.weight.grad is None
    m.zero_grad(set_to_none=True)
    out = m(ids)
    m.mtp_loss(ids, out.last_hidden, detach_main=False).backward()
    assert m.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert m.lm_head.weight.grad.abs().sum() > 0


def test_mtp_loss_value_and_packed_boundaries():
    m = _model(4)
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    out = m(ids)
    logits = m.mtp_logits(out.last_hidden[:, :-1], ids[:, 1:])  # position i predicts ids[i+2]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(m.mtp_loss(ids, out.last_hidden, lam=0.5), 0.5 * ce, atol=1e-5, rtol=1e-5)
    # packed: the loss of two packed sequences equals the token-weighted mean of their separate losses
    a, b = torch.randint(0, 128, (6,)), torch.randint(0, 128, (8,))
    cu = torch.tensor([0, 6, 14], dtype=torch.int32)
    packed = torch.cat([a, b])[None]
    lp = m.mtp_loss(packed, m(packed, cu_seqlens=cu).last_hidden, cu_seqlens=cu, lam=1.0)
    la = m.mtp_loss(a[None], m(a[None]).last_hidden, lam=1.0)
    lb = m.mtp_loss(b[None], m(b[None]).last_hidden, lam=1.0)
    torch.testing.assert_close(lp, (la * 4 + lb * 6) / 10, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    m = _model(5)
    tok = build_char_tokenizer()
    m.save_pretrained(tmp_path, tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["num_nextn_predict_layers"] == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.mtp_layers.0.input_proj.weight" in names and "model.mtp_layers.0.self_attn.q_proj.bias" in names
    assert "lm_head.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    m2 = PolicyModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 10))
    o1, o2 = m(ids), m2(ids)
    torch.testing.assert_close(o1.logits, o2.logits, atol=0, rtol=0)
    torch.testing.assert_close(m.mtp_logits(o1.last_hidden, ids), m2.mtp_logits(o2.last_hidden, ids), atol=0, rtol=0)
    tok2 = load_tokenizer(tmp_path)
    text = "<think>\n12*7 = 84\n</think> <answer>84</answer>"
    assert tok2.decode(tok2.encode(text, add_special_tokens=False)) == text


def test_tied_embeddings_round_trip(tmp_path):
    m = _model(6, tie_word_embeddings=True, num_mtp_layers=0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(tmp_path)
    m2 = PolicyModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(m(ids).logits, m2(ids).logits, atol=0, rtol=0)


def test_bad_inputs(tmp_path):
    m = _model(7, num_mtp_layers=0)
    with pytest.raises(ValueError, match="num_mtp_layers"):
        m.mtp_loss(torch.zeros(1, 4, dtype=torch.long) + 3, torch.randn(1, 4, 128))
    with pytest.raises(ValueError, match="vocab_size"):
        m(torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.ones(1, 600, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.ones(1, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="vocab_size is 64"):
        PolicyModel(PolicyConfig.tiny(vocab_size=64)).save_pretrained(tmp_path, build_char_tokenizer())
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig.tiny(num_heads=5)
