"""DAPO's dynamic sampling in the trainer: more prompt groups until a step has enough whose rewards vary.

The decisions are the pure functions of `r1engine.algo.dapo`; this module runs the rounds through a callback that
samples and scores prompts, and merges the groups chosen from all rounds into one rollout. With several ranks each
rank needs its own share of informative groups; the ranks exchange their counts after every round, so that they
run the same rounds and take the same prompts from their (identical) data streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1engine.algo.dapo import choose_groups, informative_groups, next_round_prompts
from r1engine.data.problem import Problem
from r1engine.rewards.scheduler import RewardBatch
from r1engine.rollout.base import RolloutBatch, RolloutStats

__all__ = ["ScoredGroups", "sample_informative_groups"]


@dataclass
class ScoredGroups:
    """Prompt groups sampled and scored: `problems[j]` with its prompt ids `prompts[j]`; their G completions each in
    `rollout` (prompt-major, `rollout.prompt_index` pointing into `problems`) and `scored`; `rewards`
    ``[len(problems) * G]``: the rewards the advantages are computed from (the scores plus any shaping, such as the
    overlong penalty)."""

    problems: list[Problem]
    prompts: list[list[int]]
    rollout: RolloutBatch
    scored: RewardBatch
    rewards: torch.Tensor


def sample_informative_groups(
    first: ScoredGroups,
    sample: Callable[[int, int, bool], ScoredGroups | None],
    *,
    needed: int,
    group_size: int,
    max_rounds: int,
    rank: int = 0,
    num_ranks: int = 1,
    sum_across_ranks: Callable[[list[float]], list[float]] = list,
) -> tuple[ScoredGroups, dict[str, float]]:
    """A step's `needed` prompt groups on this rank, as many as there are with rewards that vary.

    `first`: the groups of the step's own prompts. While some rank has fewer than `needed` informative groups and
    fewer than `max_rounds` rounds ran (the first included), another round runs: `sample(round, prompts, generate)`
    takes `prompts` more prompts per rank from the data and, when `generate` (this rank still needs groups),
    samples and scores them (else returns None); the round's size is `next_round_prompts` of the counts of all
    ranks. Short after the last round, uninformative groups fill the batch (`choose_groups`).

    Returns the chosen groups (in sampling order; `scored.metrics` are the first round's, an unbiased sample of the
    policy's rewards) and the step's metrics, totals over the ranks: `dynamic_sampling/rounds`, `/groups_sampled`,
    `/groups_dropped` (their rewards all equal), `/kept_frac` (the share of the sampled groups whose rewards vary)
    and `/groups_filled` (uninformative groups trained on because the rounds ran out)."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds: expected an int >= 1, got {max_rounds!r}")
    if len(first.problems) != needed:
        raise ValueError(f"first: expected the step's {needed} prompt groups, got {len(first.problems)}")
    parts, flags, rounds = [first], [informative_groups(first.rewards, group_size)], 1
    while True:
        varied, sampled = sum(int(f.sum()) for f in flags), sum(len(f) for f in flags)
        missing = max(0, needed - varied)
        shares = [0.0] * num_ranks
        shares[rank] = float(missing)
        totals = [int(v) for v in sum_across_ranks([*shares, float(varied), float(sampled)])]
        missing_by_rank, all_varied, all_sampled = totals[:num_ranks], totals[-2], totals[-1]
        if max(missing_by_rank) == 0 or rounds >= max_rounds:
            break
        more = sample(rounds, next_round_prompts(max(missing_by_rank), all_varied, all_sampled, needed), missing > 0)
        rounds += 1
        if more is not None:
            parts.append(more)
            flags.append(informative_groups(more.rewards, group_size))
    chosen, _ = choose_groups(torch.cat(flags), needed)
    metrics = {
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/groups_sampled": float(all_sampled),
        "dynamic_sampling/groups_dropped": float(all_sampled - all_varied),
        "dynamic_sampling/kept_frac": all_varied / all_sampled,
        "dynamic_sampling/groups_filled": float(sum(missing_by_rank)),
    }
    return _merge(parts, chosen, group_size), metrics


def _merge(parts: list[ScoredGroups], chosen: list[int], group_size: int) -> ScoredGroups:
    """Groups `chosen` (indices over all of `parts`' groups, in order) as one `ScoredGroups`; the rollout's stats
    count everything generated, the reward metrics are the first part's."""
    for n, part in enumerate(parts):
        expected = torch.arange(len(part.problems)).repeat_interleave(group_size)
        if not torch.equal(part.rollout.prompt_index.cpu(), expected) or len(part.rewards) != len(expected):
            raise ValueError(f"parts[{n}]: expected {group_size} completions per prompt, prompt-major, with rewards")
    groups = [(p, j) for p, part in enumerate(parts) for j in range(len(part.problems))]
    groups = [groups[c] for c in chosen]
    rows = [(p, j * group_size + k) for p, j in groups for k in range(group_size)]
    first = parts[0].scored

    def pick(get: Callable[[ScoredGroups], list]) -> list:
        return [get(parts[p])[i] for p, i in rows]

    nan = float("nan")
    scored = RewardBatch(
        scores=pick(lambda s: s.scored.scores),
        per_function={k: pick(lambda s, k=k: s.scored.per_function.get(k, [nan] * len(s.rewards))) for k in
                      first.per_function},
        reasons={k: pick(lambda s, k=k: s.scored.reasons.get(k, [None] * len(s.rewards))) for k in first.reasons},
        metrics=dict(first.metrics),
    )  # fmt: skip
    rollout = RolloutBatch(
        prompt_index=torch.arange(len(groups)).repeat_interleave(group_size),
        completion_ids=pick(lambda s: s.rollout.completion_ids),
        logprobs=pick(lambda s: s.rollout.logprobs),
        finish_reason=pick(lambda s: s.rollout.finish_reason),
        stats=RolloutStats.combined([part.rollout.stats for part in parts]),
        prompt_ids=pick(lambda s: s.rollout.prompt_ids) if all(s.rollout.prompt_ids for s in parts) else [],
        versions=pick(lambda s: s.rollout.versions) if all(s.rollout.versions for s in parts) else [],
    )
    return ScoredGroups(
        problems=[parts[p].problems[j] for p, j in groups],
        prompts=[parts[p].prompts[j] for p, j in groups],
        rollout=rollout,
        scored=scored,
        rewards=torch.stack(pick(lambda s: s.rewards)) if rows else torch.zeros(0),
    )
