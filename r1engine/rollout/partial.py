"""Partial rollouts: a generation sampled in segments of at most `segment_tokens` new tokens, so that weights
arriving while it runs (asynchronous RL's in-flight weight updates) take effect at the next segment boundary instead
of after the whole batch.

Each segment is one `engine.generate` call. After the first (n completions per prompt), every completion that used
its whole segment budget without stopping continues as a prompt of its own (the prompt plus its tokens so far, n=1);
those that stopped, or reached `max_new_tokens`, are done. The continuing completions all have the same length (each
used every segment's budget), so one call serves them. Between segments `between()` runs: the rollout worker loads the
weights that reached it there, and the engine's `version` moves on. Every token keeps the log-prob and the version of
the weights that sampled it (`RolloutBatch.versions`), which is what the off-policy correction needs; a completion
resumed after a weight update mixes two versions.

The cost is a prefill of the continued sequences per segment (vLLM's prefix cache takes most of it on GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from r1engine.rollout.base import RolloutBatch, RolloutStats

# segment s samples with seed + s * _SEED_STRIDE: distinct streams per segment, reproducible from the batch's seed
_SEED_STRIDE = 1_000_003


def generate_in_segments(
    engine: Any,
    prompt_ids: list[list[int]],
    *,
    segment_tokens: int,
    n: int = 1,
    max_new_tokens: int = 64,
    seed: int | None = None,
    between: Callable[[], None] | None = None,
    **sampling: Any,
) -> RolloutBatch:
    """Sample like `engine.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, seed=seed, **sampling)`, in
    segments of at most `segment_tokens` new tokens with `between()` called before each continuation."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    budget = min(segment_tokens, max_new_tokens)
    first = engine.generate(prompt_ids, n=n, max_new_tokens=budget, seed=seed, **sampling)
    ids = [list(c) for c in first.completion_ids]
    logprobs = [[lp] for lp in first.logprobs]
    versions = [[_versions_of(first, i, engine)] for i in range(len(ids))]
    finish = list(first.finish_reason)
    stats = [first.stats]
    prompt_of = first.prompt_ids or [list(prompt_ids[int(p)]) for p in first.prompt_index]  # one per completion

    segment = 1
    while True:
        active = [i for i in range(len(ids)) if finish[i] == "length" and len(ids[i]) < max_new_tokens]
        if not active:
            break
        if between is not None:
            between()
        budget = min(segment_tokens, max_new_tokens - len(ids[active[0]]))
        step_seed = None if seed is None else int(seed) + segment * _SEED_STRIDE
        more = engine.generate(
            [prompt_of[i] + ids[i] for i in active], n=1, max_new_tokens=budget, seed=step_seed, **sampling
        )
        for j, i in enumerate(active):
            ids[i].extend(more.completion_ids[j])
            logprobs[i].append(more.logprobs[j])
            versions[i].append(_versions_of(more, j, engine))
            finish[i] = more.finish_reason[j]
        stats.append(more.stats)
        segment += 1

    return RolloutBatch(
        prompt_index=first.prompt_index,
        completion_ids=ids,
        logprobs=[torch.cat(parts) for parts in logprobs],
        finish_reason=finish,
        stats=replace(RolloutStats.combined(stats), num_completions=len(ids)),
        prompt_ids=prompt_of,
        versions=[torch.cat(parts) for parts in versions],
    )


def _versions_of(batch: RolloutBatch, i: int, engine: Any) -> torch.Tensor:
    """Completion i's per-token versions (the engine's version for every token when the batch has none)."""
    if batch.versions:
        return batch.versions[i]
    return torch.full((len(batch.completion_ids[i]),), int(engine.version), dtype=torch.long)


def mixed_version_fraction(batch: RolloutBatch) -> float:
    """The share of a batch's completions sampled by more than one policy version (resumed after an update)."""
    if not batch.versions:
        return 0.0
    mixed = sum(1 for v in batch.versions if len(v) and int(v.min()) != int(v.max()))
    return mixed / len(batch.versions)
