"""DAPO's data-side techniques: dynamic sampling, overlong filtering and the soft overlong punishment, as pure
functions (r1engine/algo/dapo.py) and the rounds of dynamic sampling (r1engine/trainer/dynamic_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from r1engine.algo.dapo import (
    choose_groups,
    informative_groups,
    next_round_prompts,
    overlong_penalty,
    truncated_completions,
)
from r1engine.data.problem import Problem
from r1engine.rewards.scheduler import RewardBatch
from r1engine.rollout.base import RolloutBatch, RolloutStats
from r1engine.trainer.dynamic_sampling import ScoredGroups, sample_informative_groups

# --- the pure functions -----------------------------------------------------------------------------------------


def test_informative_groups_are_those_whose_rewards_vary():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1e-7])
    assert informative_groups(rewards, 3).tolist() == [False, True, False, True]
    assert informative_groups(rewards.view(4, 3), 3).tolist() == [False, True, False, True]
    assert not informative_groups(torch.full((8,), 0.3), 4).any()  # all groups equal: none
    assert not informative_groups(torch.tensor([0.2, 0.9, 0.4]), 1).any()  # a group of one never varies
    with pytest.raises(ValueError, match="rewards"):
        informative_groups(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size"):
        informative_groups(torch.zeros(6), 0)


def test_choose_groups_takes_the_first_informative_then_fills_in_order():
    flags = torch.tensor([False, True, False, True, True, False])
    assert choose_groups(flags, 2) == ([1, 3], 0)  # enough vary: the first ones, in sampling order
    assert choose_groups(flags, 3) == ([1, 3, 4], 0)
    assert choose_groups(flags, 5) == ([0, 1, 2, 3, 4], 2)  # too few vary: the first dropped ones fill the batch
    assert choose_groups(torch.zeros(4, dtype=torch.bool), 4) == ([0, 1, 2, 3], 4)  # all groups equal
    assert choose_groups(flags, 0) == ([], 0)
    with pytest.raises(ValueError, match="needed"):
        choose_groups(flags, 7)
    with pytest.raises(ValueError, match="informative"):
        choose_groups(torch.ones(3), 1)


def test_next_round_prompts_follows_the_rate_seen_between_the_gap_and_the_limit():
    assert next_round_prompts(2, 6, 8, 8) == 3  # 2 more at 6 of 8: ceil(2 / 0.75)
    assert next_round_prompts(3, 2, 8, 8) == 8  # 12 expected, at most the limit
    assert next_round_prompts(3, 0, 8, 8) == 8  # nothing varied yet: the limit
    assert next_round_prompts(4, 16, 16, 8) == 4  # every group varied: at least the gap
    assert next_round_prompts(0, 1, 8, 8) == 0
    with pytest.raises(ValueError, match="missing"):
        next_round_prompts(9, 1, 8, 8)
    with pytest.raises(ValueError, match="informative"):
        next_round_prompts(1, 9, 8, 8)


def test_truncated_completions_are_those_without_a_stop_token_at_the_end():
    eos, other = 2, 5
    completions = [
        [7, 8, eos],  # ended
        [7, 8, 9],  # cut off at the limit
        [eos, 7, 8],  # a stop id inside does not end it (the engines stop at the first one)
        [7, 8, other],  # either stop id ends it
        [],  # nothing generated
        [7, 8, 9, 10, eos],  # a stop token at the very last position allowed: ended, not truncated
    ]
    assert truncated_completions(completions, [eos, other]).tolist() == [False, True, True, False, True, False]
    assert truncated_completions(completions, []).all()  # without stop tokens every completion runs to the limit
    assert truncated_completions([], [eos]).shape == (0,)


def test_overlong_penalty_at_the_boundaries():
    max_len, buffer = 20, 4  # no penalty up to 16 tokens, linear to -1 at 20
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 40])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len, buffer), expected)
    torch.testing.assert_close(overlong_penalty(lengths, max_len, buffer, factor=0.5), 0.5 * expected)
    assert overlong_penalty(lengths, max_len, buffer).dtype == torch.float32
    # the DAPO formula, (L_max - L_cache - |y|) / L_cache inside the buffer
    inside = torch.arange(17, 21)
    torch.testing.assert_close(
        overlong_penalty(inside, max_len, buffer), ((max_len - buffer - inside) / buffer).float()
    )
    assert not overlong_penalty(lengths, max_len, 0).any()  # buffer 0: off
    full = overlong_penalty(torch.tensor([0, 10, 20]), max_len, max_len)  # the whole length is the buffer
    torch.testing.assert_close(full, torch.tensor([0.0, -0.5, -1.0]))
    assert not torch.signbit(overlong_penalty(torch.tensor([3]), max_len, buffer)).any()  # 0, not -0
    for kwargs, name in (({"buffer_len": 21}, "buffer_len"), ({"buffer_len": -1}, "buffer_len"),
                         ({"factor": -1.0}, "factor"), ({"factor": float("nan")}, "factor")):  # fmt: skip
        args = {"buffer_len": buffer, **kwargs}
        with pytest.raises(ValueError, match=name):
            overlong_penalty(lengths, max_len, args.pop("buffer_len"), **args)


# --- the rounds of dynamic sampling --------------------------------------------------------------------------------

G = 2


def _groups(rewards: list[tuple[float, float]], tag: str) -> ScoredGroups:
    """Prompt groups of G completions each with the given rewards; a completion's ids name its group and sample."""
    n = len(rewards)
    flat = [r for pair in rewards for r in pair]
    rollout = RolloutBatch(
        prompt_index=torch.arange(n).repeat_interleave(G),
        completion_ids=[[100 * j + k, 2] for j in range(n) for k in range(G)],
        logprobs=[torch.zeros(2) for _ in range(n * G)],
        finish_reason=["stop"] * (n * G),
        stats=RolloutStats(backend="test", num_completions=n * G, num_tokens=2 * n * G, elapsed_s=1.0),
        prompt_ids=[[1, j] for j in range(n) for _ in range(G)],
    )
    scored = RewardBatch(flat, {"acc": list(flat)}, {"acc": [None] * len(flat)}, {"reward/mean": sum(flat) / len(flat)})
    problems = [Problem(f"{tag}{j}", str(j)) for j in range(n)]
    return ScoredGroups(problems, [[1, j] for j in range(n)], rollout, scored, torch.tensor(flat))


def test_rounds_until_enough_groups_vary():
    rounds = {1: _groups([(1, 0), (0, 0), (1, 1), (0, 1)], "b"), 2: _groups([(0, 1)], "c")}
    asked = []

    def sample(round_, n, generate):
        asked.append((round_, n, generate))
        return rounds[round_]

    first = _groups([(0, 0), (1, 0), (1, 1), (2, 2)], "a")  # one of four varies
    chosen, m = sample_informative_groups(first, sample, needed=4, group_size=G, max_rounds=5)
    assert asked == [(1, 4, True), (2, 3, True)]  # 3 missing at 1 in 4: the limit; then 1 missing at 3 in 8
    assert [p.prompt for p in chosen.problems] == ["a1", "b0", "b3", "c0"]
    assert informative_groups(chosen.rewards, G).all()
    assert chosen.rollout.completion_ids[:4] == [[100, 2], [101, 2], [0, 2], [1, 2]]
    assert chosen.rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chosen.scored.scores == chosen.rewards.tolist() == chosen.scored.per_function["acc"]
    assert chosen.scored.metrics == first.scored.metrics  # the reward metrics are the first round's
    assert chosen.rollout.stats.num_completions == 18 and chosen.rollout.stats.elapsed_s == 3.0  # all generated
    assert m == {"dynamic_sampling/rounds": 3.0, "dynamic_sampling/groups_sampled": 9.0,
                 "dynamic_sampling/groups_dropped": 5.0, "dynamic_sampling/kept_frac": 4 / 9,
                 "dynamic_sampling/groups_filled": 0.0}  # fmt: skip


def test_first_round_enough_samples_nothing_more():
    first = _groups([(0, 1), (1, 0)], "a")
    chosen, m = sample_informative_groups(first, pytest.fail, needed=2, group_size=G, max_rounds=3)
    assert chosen.problems == first.problems and m["dynamic_sampling/rounds"] == 1.0
    assert m["dynamic_sampling/kept_frac"] == 1.0 and m["dynamic_sampling/groups_dropped"] == 0.0


def test_the_round_cap_ends_sampling_and_dropped_groups_fill_the_batch():
    calls = []

    def sample(round_, n, generate):
        calls.append(n)
        return _groups([(1, 1)] * n, f"r{round_}-")

    first = _groups([(0, 0), (0, 1), (3, 3)], "a")
    chosen, m = sample_informative_groups(first, sample, needed=3, group_size=G, max_rounds=3)
    assert len(calls) == 2  # three rounds in all, the first included: never an endless loop
    assert [p.prompt for p in chosen.problems] == ["a0", "a1", "a2"]  # the varying group, then the first dropped
    assert m["dynamic_sampling/rounds"] == 3.0 and m["dynamic_sampling/groups_filled"] == 2.0
    assert m["dynamic_sampling/groups_sampled"] == 3.0 + sum(calls)
    # all groups equal in every round: the first round's groups, all of them filled in
    chosen, m = sample_informative_groups(_groups([(1, 1)] * 3, "z"), sample, needed=3, group_size=G, max_rounds=2)
    assert [p.prompt for p in chosen.problems] == ["z0", "z1", "z2"]
    assert m["dynamic_sampling/kept_frac"] == 0.0 and m["dynamic_sampling/groups_filled"] == 3.0
    # one round: nothing more is sampled
    chosen, m = sample_informative_groups(first, pytest.fail, needed=3, group_size=G, max_rounds=1)
    assert m["dynamic_sampling/rounds"] == 1.0 and m["dynamic_sampling/groups_filled"] == 2.0


def test_ranks_run_the_same_rounds_and_only_the_short_ones_generate():
    """Two ranks, simulated: each sees the other's counts through `sum_across_ranks`."""
    other_rank = {"missing": 2, "varied": 0, "sampled": 2}

    def sum_across_ranks(values):  # this rank is rank 0 of 2; rank 1 still misses 2 groups
        return [values[0], values[1] + other_rank["missing"], values[2] + other_rank["varied"],
                values[3] + other_rank["sampled"]]  # fmt: skip

    asked = []

    def sample(round_, n, generate):
        asked.append((n, generate))
        return None  # this rank needs nothing more: it takes the prompts, generates none

    first = _groups([(0, 1), (1, 0)], "a")
    chosen, m = sample_informative_groups(first, sample, needed=2, group_size=G, max_rounds=3, rank=0, num_ranks=2,
                                          sum_across_ranks=sum_across_ranks)  # fmt: skip
    assert asked == [(2, False), (2, False)]  # the other rank's gap of 2 at 2 in 4 (limit 2), until the cap
    assert chosen.problems == first.problems
    assert m["dynamic_sampling/rounds"] == 3.0 and m["dynamic_sampling/groups_filled"] == 2.0
