"""DAPO's data-side techniques: dynamic sampling, overlong filtering and the soft overlong punishment, as pure
functions (r1engine/algo/dapo.py, r1engine/trainer/dynamic_sampling.py) and in short trainer runs (`dapo.*`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
from r1engine.trainer.config import ConfigError, load_config
from r1engine.trainer.dynamic_sampling import ScoredGroups, sample_informative_groups
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics
from r1engine.trainer.sequences import loss_tokens, pack

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


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dapo.max_sampling_rounds=0", "dapo.max_sampling_rounds"),
        ("dapo.overlong_buffer_len=-1", "dapo.overlong_buffer_len"),
        ("dapo.overlong_buffer_len=73", "dapo.overlong_buffer_len"),  # longer than grpo.max_new_tokens
        ("dapo.overlong_penalty_factor=-0.5", "dapo.overlong_penalty_factor"),
        ("dapo.overlong_penalty_factor=.nan", "dapo.overlong_penalty_factor"),
        ("dapo.mask_truncated_completions=maybe", "dapo.mask_truncated_completions"),
    ],
)
def test_bad_dapo_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, ["grpo.max_new_tokens=72", override])


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ConfigError, match=r"^dapo.dynamic_sampling: .*grpo.group_size"):
        load_config(None, ["dapo.dynamic_sampling=true", "grpo.group_size=1", "grpo.advantage=drgrpo"])
    cfg = load_config(None, ["dapo.dynamic_sampling=true", "dapo.overlong_buffer_len=72", "grpo.max_new_tokens=72"])
    assert cfg.dapo.dynamic_sampling and cfg.dapo.overlong_buffer_len == 72
    assert load_config(None).dapo.dynamic_sampling is False  # all off by default
    assert cfg.to_dict()["dapo"]["max_sampling_rounds"] == 4


# --- short trainer runs ------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "kind": "flat" if i % 2 else "vary"}
        for i, (a, b) in enumerate((i * 7 % 50, i * 13 % 40) for i in range(48))]  # fmt: skip
PROMPTS, GROUP = 4, 4
RUN = [
    "model.preset=tiny",
    "model.mtp_layers=0",
    "rollout.num_speculative_tokens=0",
    "rollout.backend=native",
    "sft.steps=0",
    f"grpo.prompts_per_step={PROMPTS}",
    f"grpo.group_size={GROUP}",
    "grpo.mini_batches=2",
    "grpo.max_new_tokens=16",
    "grpo.beta=0",
    "grpo.lr=1.0e-3",
    "training.chunk_len=64",
    "training.num_threads=1",
    "data.eval_size=4",
    "eval.samples=1",
    "eval.every=100",
    "checkpoint.every=0",
]


def vary_by_kind(completions, references, **columns):
    """Rows of kind "vary": a score that differs between samples (a checksum of the text); "flat": always 1."""
    kinds = columns.get("kind", ["flat"] * len(completions))  # the held-out correctness passes no columns
    return [float(sum(map(ord, c)) % 97) if kind == "vary" else 1.0 for c, kind in zip(completions, kinds, strict=True)]


def always_one(completions, references, **columns):
    return [1.0] * len(completions)


class RecordingTrainer(GRPOTrainer):
    """Keeps what each step trains on: (sequences, training fields, metrics)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts: list = []

    def generate_and_score(self, step):
        out = super().generate_and_score(step)
        self.rollouts.append(out)
        return out


def _run(tmp_path, reward, *overrides: str) -> RecordingTrainer:
    cfg = load_config(None, [f"output_dir={tmp_path}", *RUN, *overrides])
    trainer = RecordingTrainer(cfg, dataset=ROWS, reward_fns=[reward], progress=False)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def _group_spread(rewards: torch.Tensor) -> torch.Tensor:
    r = rewards.view(-1, GROUP)
    return r.max(1).values - r.min(1).values


@pytest.mark.timeout(600)
def test_dynamic_sampling_trains_on_groups_that_vary_and_resumes(tmp_path):
    dynamic = ("dapo.dynamic_sampling=true", "dapo.max_sampling_rounds=6", "training.deterministic=true")
    trainer = _run(tmp_path / "straight", vary_by_kind, "grpo.steps=2", *dynamic)
    taken = 0
    for seqs, fields, m in trainer.rollouts:
        assert len(seqs) == PROMPTS * GROUP  # the batch keeps its size
        spread = _group_spread(fields["rewards"])
        assert (spread > 0).all() and m["dynamic_sampling/groups_filled"] == 0.0  # every group trained on varies
        assert m["adv/zero_frac"] == 0.0 and (fields["adv"].view(-1, GROUP).abs().sum(1) > 0).all()
        assert m["dynamic_sampling/rounds"] >= 2  # half the rows score 1 whatever the completion: dropped
        assert m["dynamic_sampling/groups_dropped"] > 0
        sampled, dropped = m["dynamic_sampling/groups_sampled"], m["dynamic_sampling/groups_dropped"]
        assert m["dynamic_sampling/kept_frac"] == pytest.approx((sampled - dropped) / sampled)
        taken += sampled
    # the extra prompts came from the data stream, whose position a checkpoint saves
    assert trainer.stream.state() == {"inner": {"epoch": 0, "index": taken}, "count": taken, "pass_over": []}
    saved = torch.load(tmp_path / "straight" / "checkpoints" / "step-000002" / "trainer.pt", weights_only=False)
    assert saved["stream"] == trainer.stream.state()
    # stopped after one step and resumed: the second step samples and trains as in the uninterrupted run
    _run(tmp_path / "resumed", vary_by_kind, "grpo.steps=1", *dynamic)
    resumed = _run(tmp_path / "resumed", vary_by_kind, "grpo.steps=2", *dynamic)
    volatile = ("time/", "rollout/tokens_per_s", "scheduler/latency_s")
    straight, again = (read_metrics(tmp_path / d / "metrics.jsonl")[-1] for d in ("straight", "resumed"))
    assert again["step"] == 2 and {k: v for k, v in again.items() if not k.startswith(volatile)} == {
        k: v for k, v in straight.items() if not k.startswith(volatile)
    }
    assert resumed.stream.state() == trainer.stream.state()


@pytest.mark.timeout(600)
def test_dynamic_sampling_stops_at_the_round_cap(tmp_path):
    trainer = _run(tmp_path, always_one, "grpo.steps=1", "dapo.dynamic_sampling=true", "dapo.max_sampling_rounds=2")
    ((seqs, fields, m),) = trainer.rollouts
    assert m["dynamic_sampling/rounds"] == 2.0 and m["dynamic_sampling/kept_frac"] == 0.0
    assert m["dynamic_sampling/groups_sampled"] == 2 * PROMPTS and m["dynamic_sampling/groups_filled"] == PROMPTS
    assert len(seqs) == PROMPTS * GROUP and not fields["adv"].any()  # trained anyway, on zero advantages
    assert m["train/skipped_seq_frac"] > 0
    assert trainer.stream.state()["inner"]["index"] == 2 * PROMPTS


@pytest.mark.timeout(600)
def test_truncated_completions_get_no_loss_tokens(tmp_path):
    trainer = _run(tmp_path, vary_by_kind, "grpo.steps=2", "dapo.mask_truncated_completions=true")
    stop = set(trainer.codec.stop_ids)
    seen = {True: 0, False: 0}
    for seqs, _, m in trainer.rollouts:
        # a sequence is prompt + completion: a completion that does not end with a stop token was cut off
        truncated = [int(ids[-1]) not in stop for ids in seqs.input_ids]
        for t, mask in zip(truncated, seqs.loss_mask, strict=True):
            assert (int(mask.sum()) == 0) == t  # truncated: masked whole; ended: its completion tokens are trained
            seen[t] += 1
        assert m["overlong/masked_frac"] == pytest.approx(sum(truncated) / len(truncated))
        assert m["rollout/truncated_frac"] == pytest.approx(m["overlong/masked_frac"])
        batch, _ = pack(seqs, 64)
        assert set(loss_tokens(batch).seq_ids.tolist()) == {i for i, t in enumerate(truncated) if not t}
    assert seen[True] > 0  # a random policy runs into the limit
    records = [r for _, _, r in trainer.rollouts]
    assert all(r["loss/policy"] == r["loss/policy"] for r in records)  # trains (no NaN) even when all are cut off


@pytest.mark.timeout(600)
def test_soft_overlong_punishment_is_added_to_the_reward(tmp_path):
    trainer = _run(tmp_path, always_one, "grpo.steps=1", "dapo.overlong_buffer_len=8",
                   "dapo.overlong_penalty_factor=0.5")  # fmt: skip
    ((seqs, fields, m),) = trainer.rollouts
    lengths = torch.tensor([int(mask.sum()) for mask in seqs.loss_mask])  # one loss position per completion token
    penalty = overlong_penalty(lengths, 16, 8, 0.5)
    assert (penalty < 0).any()
    torch.testing.assert_close(fields["rewards"], 1.0 + penalty)  # the rule reward is 1 everywhere
    assert m["reward/overlong_penalty_mean"] == pytest.approx(float(penalty.mean()))
    assert m["overlong/penalized_frac"] == pytest.approx(float((penalty < 0).float().mean()))
    assert m["reward/mean"] == 1.0  # the reward metrics are the rule rewards'
    # groups whose lengths differ get advantages from the penalty alone
    spread = _group_spread(fields["rewards"]) > 0
    assert ((fields["adv"].view(-1, GROUP).abs().sum(1) > 0) == spread).all()


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_ranks_sample_the_same_rounds(tmp_path):
    """Two ranks (real processes, gloo, ZeRO-1): each needs its own share of varying groups, they run the same
    rounds and log one set of totals."""
    pytest.importorskip("deepspeed")
    tiny = [
        "model.preset=tiny", "task.max_digits=2", "task.num_eval=8", "sft.steps=4", "sft.batch_size=8",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.mini_batches=2", "grpo.max_new_tokens=24",
        "grpo.beta=0", "training.chunk_len=64", "training.num_threads=1", "eval.every=10", "checkpoint.every=1",
        "rollout.backend=native", "training.deepspeed_zero_stage=1", "grpo.steps=2",
    ]  # fmt: skip
    dapo = ["dapo.dynamic_sampling=true", "dapo.max_sampling_rounds=3", "dapo.mask_truncated_completions=true",
            "dapo.overlong_buffer_len=8"]  # fmt: skip
    cmd = [sys.executable, "-m", "r1engine.cli", "train", "--nproc=2", "--no-progress", "--config",
           str(ROOT / "configs" / "demo.yaml"), f"output_dir={tmp_path}", *tiny, *dapo]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")[1:]
    assert len(records) == 2
    for r in records:
        assert 1 <= r["dynamic_sampling/rounds"] <= 3
        sampled, dropped = r["dynamic_sampling/groups_sampled"], r["dynamic_sampling/groups_dropped"]
        assert sampled >= 4 and sampled == int(sampled) and dropped == int(dropped)  # totals, equal on both ranks
        assert r["dynamic_sampling/kept_frac"] == pytest.approx((sampled - dropped) / sampled)
        assert 0 <= r["dynamic_sampling/groups_filled"] <= 4
        assert 0 <= r["overlong/masked_frac"] <= 1 and -1 <= r["reward/overlong_penalty_mean"] <= 0
