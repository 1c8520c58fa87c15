"""Hugging Face checkpoints of every supported family (Qwen2, Llama, Qwen3) as the policy, against transformers'
own `AutoModelForCausalLM` on the same weights: packed forward, cached decoding, greedy generations, RoPE scalings,
MTP attachment, checkpoints (tokenizer byte-identical), export, and the errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from r1engine.models import KVCache, PolicyConfig, PolicyModel
from r1engine.models.checkpoint import read_config
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.models.tokenizer import TextCodec, load_tokenizer
from r1engine.rollout.native_engine import NativeEngine

transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen2", "llama", "qwen3")
ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """A tiny random checkpoint per family, untied and tied."""
    root = tmp_path_factory.mktemp("hf")
    return {
        (family, tied): make_tiny_hf_model(family, root / f"{family}-{tied}", seed=3, tie_word_embeddings=tied)
        for family in FAMILIES
        for tied in (False, True)
    }


def _hf(path: Path, dtype: torch.dtype = torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _random_ids(vocab: int, lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_packed_forward_equals_transformers(hf_dirs, family, tied, dtype, tol):
    path = hf_dirs[family, tied]
    model = PolicyModel.from_pretrained(path, dtype=dtype).eval()
    hf = _hf(path, dtype)
    assert model.config.architecture == ARCH[family] and model.config.tie_word_embeddings == tied
    assert model.config.num_mtp_layers == 0
    seqs = _random_ids(model.config.vocab_size, [37, 1, 90, 12], seed=5)
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu, compute_logits=True).logits
        for s, e, seq in zip(cu[:-1].tolist(), cu[1:].tolist(), seqs, strict=True):
            ref = hf(seq[None]).logits[0].float()
            got = packed[s:e].float()
            scale = ref.abs().max().item()
            assert (got - ref).abs().max().item() <= tol * max(1.0, scale), (family, tied, dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_and_greedy_generation_equal_transformers(hf_dirs, family):
    path = hf_dirs[family, False]
    model = PolicyModel.from_pretrained(path).eval()
    hf = _hf(path)
    cfg = model.config
    prompts = _random_ids(cfg.vocab_size, [5, 11, 3], seed=7)
    steps = 6
    # logits of incremental decoding through the KV cache, one token per step, against a full forward
    cache = KVCache(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim)
    seq = prompts[1]
    with torch.no_grad():
        out = model(seq[None], kv_cache=cache)
        cache.advance(len(seq))
        ids = seq.tolist()
        nxt = int(model.logits(out.hidden[0, -1]).argmax())
        for _ in range(steps):
            ids.append(nxt)
            step = model.logits(model(torch.tensor([[nxt]]), kv_cache=cache).hidden[0, 0])
            cache.advance(1)
            ref = hf(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(step, ref, atol=2e-5, rtol=1e-4)
            nxt = int(step.argmax())
    # greedy generations of the native engine (fused decode step where it applies) equal transformers' generate
    engine = NativeEngine(model)
    batch = engine.generate([p.tolist() for p in prompts], n=1, max_new_tokens=12, temperature=0.0)
    for p, got in zip(prompts, batch.completion_ids, strict=True):
        ref = hf.generate(p[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(p) :].tolist()


@pytest.mark.parametrize(
    "family,rope",
    [
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        ("qwen2", {"rope_type": "linear", "factor": 2.5}),
        (
            "llama",
            {
                "rope_type": "yarn",
                "factor": 3.0,
                "original_max_position_embeddings": 48,
                "beta_fast": 16,
                "attention_factor": 1.3,
            },
        ),  # fmt: skip
        (
            "qwen3",
            {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 40,
            },
        ),  # fmt: skip
    ],
)
def test_rope_scalings_equal_transformers(tmp_path, family, rope):
    path = make_tiny_hf_model(family, tmp_path / "m", seed=1, rope_parameters={"rope_theta": 20000.0, **rope})
    model = PolicyModel.from_pretrained(path).eval()
    assert model.config.rope_scaling["rope_type"] == rope["rope_type"]
    ids = _random_ids(model.config.vocab_size, [200], seed=2)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, compute_logits=True).logits, _hf(path)(ids).logits, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_unsupported_rope_scaling_is_named(tmp_path, rope_type):
    path = make_tiny_hf_model("qwen2", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": rope_type, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"rope_scaling.rope_type: '{rope_type}' is not supported"):
        PolicyModel.from_pretrained(path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, r"architectures\[0\]: 'GPT2LMHeadModel' is not supported .*Qwen2"),
        ({"hidden_size": None}, "hidden_size: missing from config.json"),
        ({"hidden_act": "gelu"}, "hidden_act: only 'silu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, change, match):
    path = make_tiny_hf_model("qwen2", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        read_config(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path: .* does not exist"):
        PolicyModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.path: .* is not a model directory"):
        PolicyModel.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_hf_model("llama", tmp_path / "m")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        PolicyModel.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtp_init", ["last_layer", "random"])
def test_attach_mtp_keeps_the_model_and_round_trips(hf_dirs, tmp_path, family, mtp_init):
    path = hf_dirs[family, family == "llama"]
    plain = PolicyModel.from_pretrained(path).eval()
    model = PolicyModel.from_pretrained(path, num_mtp_layers=2, mtp_init=mtp_init, seed=4).eval()
    assert model.config.num_mtp_layers == 2 and len(model.model.mtp_layers) == 2
    ids = _random_ids(model.config.vocab_size, [40], seed=1)[0][None]
    with torch.no_grad():
        out = model(ids, compute_logits=True)
        torch.testing.assert_close(out.logits, plain(ids, compute_logits=True).logits, rtol=0, atol=0)
        loss = model.mtp_loss(ids, out.last_hidden)
    assert torch.isfinite(loss) and loss > 0
    mtp = model.model.mtp_layers[0]
    if mtp_init == "last_layer":
        torch.testing.assert_close(mtp.mlp.up_proj.weight, model.model.layers[-1].mlp.up_proj.weight)
        assert not mtp.mlp.down_proj.weight.any() and not mtp.self_attn.o_proj.weight.any()  # the block starts as id
        # so the drafter starts as the main model's next-token head one position back
        h = model.mtp_hidden(out.last_hidden[:, :-1], ids[:, 1:])
        torch.testing.assert_close(model.logits(h), out.logits[:, :-1], atol=1e-3, rtol=1e-3)  # RMSNorm twice
        if family == "qwen3":
            torch.testing.assert_close(mtp.self_attn.q_norm.weight, model.model.layers[-1].self_attn.q_norm.weight)
    tokenizer = load_tokenizer(path)
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["architectures"] == [ARCH[family]] and saved["num_nextn_predict_layers"] == 2
    back = PolicyModel.from_pretrained(tmp_path / "ckpt").eval()
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_a_plain_transformers_directory(hf_dirs, tmp_path, family):
    path = hf_dirs[family, False]
    model = PolicyModel.from_pretrained(path, num_mtp_layers=1).eval()
    with torch.no_grad():  # a "trained" policy: its weights differ from the source's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.export_pretrained(tmp_path / "out", load_tokenizer(path))
    source_cfg = json.loads((path / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg == source_cfg
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (path / name).read_bytes() or name == "generation_config.json"
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == json.loads(
        (path / "generation_config.json").read_text()
    )
    hf = _hf(tmp_path / "out")
    assert type(hf).__name__ == ARCH[family]
    ids = _random_ids(model.config.vocab_size, [33], seed=9)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, compute_logits=True).logits, atol=2e-5, rtol=1e-4)


def test_tokenizer_ids_come_from_the_tokenizer(hf_dirs):
    qwen = load_tokenizer(hf_dirs["qwen2", False])
    assert qwen.bos_token_id is None
    codec = TextCodec(qwen)
    assert None not in codec.encode("What is 17 + 25?")
    assert codec.encode("What is 17 + 25?") == qwen.encode("What is 17 + 25?")
    assert codec.decode(codec.encode("What is 17 + 25?") + codec.stop_ids[:1]) == "What is 17 + 25?"
    llama = load_tokenizer(hf_dirs["llama", False])
    ids = TextCodec(llama).encode("What is 17 + 25?")
    assert ids[0] == llama.bos_token_id and ids[1:] == llama.encode("What is 17 + 25?", add_special_tokens=False)
    config = read_config(hf_dirs["llama", False])
    assert config.bos_token_id == llama.bos_token_id and config.eos_token_id == llama.eos_token_id


def test_config_from_hf_round_trips_unknown_fields(hf_dirs):
    raw = json.loads((hf_dirs["llama", False] / "config.json").read_text())
    raw["some_future_field"] = {"kept": True}
    cfg = PolicyConfig.from_hf_dict(raw)
    assert cfg.head_dim == 16 and cfg.hidden_size == 72 and not cfg.qkv_bias and cfg.rope_scaling["factor"] == 8.0
    out = cfg.to_hf_dict()
    assert out["some_future_field"] == {"kept": True} and out["num_nextn_predict_layers"] == 0
    assert cfg.export_hf_dict() == raw


def test_bin_weights_load(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    src = hf_dirs["qwen3", False]
    dst = tmp_path / "bin"
    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    a, b = PolicyModel.from_pretrained(src), PolicyModel.from_pretrained(dst)
    for (_, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y)


def test_tied_head_stays_tied_through_copies(hf_dirs):
    model = PolicyModel.from_pretrained(hf_dirs["llama", True])
    for m in (model, model.frozen_copy(), model.frozen_copy(dtype=torch.bfloat16), NativeEngine(model).model):
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert sum(1 for _ in m.parameters()) == len(list(m.named_weights()))  # one parameter, one checkpoint tensor
