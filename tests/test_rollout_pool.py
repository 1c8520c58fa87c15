"""`RolloutPool` (issue 20): several rollout worker processes behind one trainer rank.

Real worker processes (the native engine, spawned, weights over gloo). Checked: the shards cover the prompts in
order; a greedy pool generates exactly what one in-process engine generates; weights pushed to the pool reach every
worker (one broadcast over the workers' one group), each token carrying the pushed version and that version's
log-prob; a killed worker is reported; only a whole group at one version makes a pool.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.models.toy import pattern_batch
from r1engine.rollout import create_engine
from r1engine.rollout.base import RolloutBatch, RolloutStats, concat_batches
from r1engine.rollout.pool import RolloutPool, shard_bounds
from r1engine.rollout.remote import RemoteRolloutEngine, RolloutWorkerDied

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [row[: 3 + i % 4] for i, row in enumerate(pattern_batch(n, 7, g).tolist())]


def _pool(model_dir, workers: int) -> RolloutPool:
    return RolloutPool.start(
        workers,
        lambda w, group: RemoteRolloutEngine(
            "native", model_dir=model_dir, num_threads=1, max_model_len=64, group=group, rank=w + 1
        ),
    )


@pytest.mark.parametrize(("prompts", "workers"), [(1, 1), (1, 3), (5, 2), (7, 3), (9, 4), (64, 5)])
def test_shards_cover_every_prompt_once_in_order_and_differ_by_at_most_one(prompts, workers):
    bounds = shard_bounds(prompts, workers)
    assert bounds[0][0] == 0 and bounds[-1][1] == prompts
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(bounds) == min(prompts, workers)


def test_concatenated_shards_index_their_prompts_after_the_previous_shards():
    def batch(prompts: int, n: int, version: int, elapsed: float) -> RolloutBatch:
        ids = [[prompts * 10 + i] * (i + 1) for i in range(prompts * n)]
        return RolloutBatch(
            prompt_index=torch.arange(prompts).repeat_interleave(n),
            completion_ids=ids,
            logprobs=[torch.full((len(c),), -0.5) for c in ids],
            finish_reason=["stop"] * len(ids),
            stats=RolloutStats("native", num_completions=len(ids), num_tokens=sum(map(len, ids)), elapsed_s=elapsed),
            prompt_ids=[[p] for p in range(prompts) for _ in range(n)],
            versions=[torch.full((len(c),), version) for c in ids],
        )

    a, b = batch(2, 3, 4, 1.5), batch(3, 3, 4, 2.5)
    joined = concat_batches([a, b], concurrent=True)
    assert joined.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert joined.completion_ids == a.completion_ids + b.completion_ids
    assert joined.stats.num_tokens == a.stats.num_tokens + b.stats.num_tokens
    assert joined.stats.elapsed_s == 2.5  # at once: as long as the longest
    assert concat_batches([a, b], concurrent=False).stats.elapsed_s == 4.0
    assert len(joined.versions) == len(joined.logprobs) == len(joined) == 15


@pytest.mark.timeout(300)
def test_a_greedy_pool_generates_what_one_engine_generates(fitted):
    prompts = _prompts(7, seed=1)
    kw = dict(n=2, max_new_tokens=12, temperature=0.0, seed=3)
    want = create_engine("native", model_dir=fitted, num_speculative_tokens=0, max_model_len=64).generate(prompts, **kw)
    with _pool(fitted, 3) as pool:
        got = pool.generate(prompts, **kw)
    assert got.prompt_index.tolist() == want.prompt_index.tolist()
    assert got.completion_ids == want.completion_ids
    assert got.prompt_ids == want.prompt_ids and got.finish_reason == want.finish_reason
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert got.stats.num_completions == 14 and got.stats.num_tokens == sum(map(len, got.completion_ids))


@torch.no_grad()
def _teacher_forced(model: PolicyModel, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.timeout(300)
def test_weights_pushed_to_the_pool_reach_every_worker(fitted):
    """Three workers: the broadcast over their one group is a tree (the trainer sends to two, one of those forwards
    to the third), so a worker's weights may come through another worker."""
    new = PolicyModel.from_pretrained(fitted).eval()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = _prompts(6, seed=2)
    with _pool(fitted, 3) as pool:
        first = pool.submit(prompts, n=2, max_new_tokens=10, seed=0)  # queued before the push: the old weights
        pool.push_weights(new, version=7)
        held = [{b.data_ptr() for b in e.push_buffers} for e in pool.engines]
        assert held[0] and all(h == held[0] for h in held)  # one copy of the weights for the whole pool
        second = pool.submit(prompts, n=2, max_new_tokens=10, temperature=0.7, seed=1)
        before, after = first.result(), second.result()
        assert pool.version == 7 and all(e.version == 7 for e in pool.engines)
        info = pool.sync_weights(new)  # waits for the push above, then sends the weights to every worker again
        assert pool.version == 8 and all(e.version == 8 for e in pool.engines)
        assert all(not e.push_buffers for e in pool.engines)  # the finished push let its copy go
        assert info["bytes"] >= 4 * new.num_parameters() and info["workers"] == 3 and info["seconds"] > 0
    assert all(int(v.max()) == 0 for v in before.versions)
    assert all(len(v) and bool((v == 7).all()) for v in after.versions)
    for p, c, lp in zip(after.prompt_ids, after.completion_ids, after.logprobs, strict=True):
        torch.testing.assert_close(lp, _teacher_forced(new, p, c, 0.7), rtol=0, atol=2e-4)


@pytest.mark.timeout(300)
def test_a_killed_worker_is_reported_and_the_pool_closes(fitted):
    pool = _pool(fitted, 2)
    try:
        os.kill(pool.pids[1], signal.SIGKILL)
        with pytest.raises(RolloutWorkerDied, match="SIGKILL"):
            pool.generate(_prompts(4, seed=3), n=1, max_new_tokens=6)
    finally:
        pool.close()


def test_a_pool_takes_only_its_whole_weight_group_at_one_version(fitted):
    model = PolicyModel.from_pretrained(fitted)
    with _pool(fitted, 2) as pool:
        with pytest.raises(ValueError, match="ranks of one WeightGroup"):
            RolloutPool(pool.engines[:1])  # the other rank would miss every broadcast
        with pytest.raises(ValueError, match="2 workers, all of which take each update together"):
            pool.engines[0].sync_weights(model)  # alone, over a group that needs both
        pool.engines[1].version += 1
        with pytest.raises(ValueError, match="one model at one version"):
            RolloutPool(pool.engines)
        pool.engines[1].version -= 1
        wider = PolicyModel(model.config.replace(intermediate_size=2 * model.config.intermediate_size))
        for update in (pool.sync_weights, pool.push_weights):
            with pytest.raises(ValueError, match="model config .* differs from the engines'"):
                update(wider)  # another architecture than the workers'
        assert pool.sync_weights(model)["workers"] == 2 and pool.version == 1  # still usable after the refusals
