"""RewardScheduler: order, overlap, and failures (a reward that raises, one that hangs, a worker that dies)."""

from __future__ import annotations

import os
import random
import time

import pytest

from r1engine.rewards import CombinedReward, RewardScheduler

MOD = "test_rewards_scheduler"


def raising_reward(completions, references):
    raise RuntimeError("reward bug")


def faulty_reward(completions, references):
    """1.0 per sample, except: "HANG" sleeps forever, "DIE" kills the worker process, "SLOW" takes 0.3 s."""
    from r1engine.rewards import RewardResult

    out = []
    for c in completions:
        if c == "HANG":
            time.sleep(3600)
        if c == "DIE":
            os._exit(13)
        if c == "SLOW":
            time.sleep(0.3)
        out.append(RewardResult(1.0))
    return out


def _batch(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, refs = [], []
    for _ in range(n):
        a = rng.randint(-50, 50)
        fmt = rng.random() < 0.7
        ans = a if rng.random() < 0.6 else a + 1
        texts.append(f"<think>t</think><answer>{ans}</answer>" if fmt else f"<answer>{ans}</answer> tail")
        refs.append(a)
    return texts, refs


def test_results_in_input_order_match_inprocess_oracle():
    weights = {"format": 0.5, "arithmetic": 1.0}
    texts, refs = _batch(37, seed=3)
    oracle = CombinedReward(weights).evaluate(texts, refs)
    with RewardScheduler({"weights": weights}, num_workers=2, chunk_size=5) as sched:
        h1 = sched.submit(texts, refs)
        h2 = sched.submit(texts[::-1], refs[::-1])
        b1, b2 = h1.result(60), h2.result(60)
    assert b1.scores == oracle.scores
    assert b2.scores == oracle.scores[::-1]
    assert b1.per_function["arithmetic"] == [r.score for r in oracle.per_function["arithmetic"]]
    assert b1.metrics["arithmetic/pass_rate"] == pytest.approx(oracle.metrics["arithmetic/pass_rate"])
    assert b1.metrics["scheduler/failed_rows"] == 0.0
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(texts, refs)


def test_raising_reward_gives_failure_value_and_others_still_count():
    cfg = {"weights": {"arithmetic": 1.0, f"{MOD}:raising_reward": 1.0}}
    with RewardScheduler(cfg, num_workers=1, failure_value=-0.5) as sched:
        b = sched.score(["<answer>3</answer>", "<answer>4</answer>"], [3, 3], timeout=60)
    assert b.per_function[f"{MOD}:raising_reward"] == [-0.5, -0.5]
    assert b.reasons[f"{MOD}:raising_reward"][0] == "error: RuntimeError: reward bug"
    assert b.scores == [1.0 - 0.5, 0.0 - 0.5]
    assert b.metrics[f"{MOD}:raising_reward/errors"] == 2.0


def test_hanging_and_dying_rewards_are_contained_and_workers_replaced():
    cfg = {"weights": {f"{MOD}:faulty_reward": 1.0, "format": 1.0}}
    texts = ["ok", "HANG", "ok", "DIE", "ok", "ok"]
    with RewardScheduler(cfg, num_workers=2, timeout_s=1.5, chunk_size=1, failure_value=0.0) as sched:
        t0 = time.monotonic()
        b = sched.submit(texts, [None] * 6).result(timeout=60)
        elapsed = time.monotonic() - t0
        assert elapsed < 20
        faulty = b.per_function[f"{MOD}:faulty_reward"]
        assert faulty == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
        reasons = b.reasons[f"{MOD}:faulty_reward"]
        assert reasons[1] == "timeout" and reasons[3] == "worker crashed"
        assert b.reasons["format"][1] == "timeout"  # every reward of the failed chunk gets the defined value
        assert b.metrics[f"{MOD}:faulty_reward/timeouts"] == 1.0
        assert b.metrics["scheduler/failed_rows"] == 2.0
        assert sched.workers_replaced == 2
        # the pool still works afterwards
        again = sched.score(["ok"] * 4, [None] * 4, timeout=60)
        assert again.per_function[f"{MOD}:faulty_reward"] == [1.0] * 4


def test_a_timeout_costs_only_its_own_row():
    # One worker, one chunk of 8 in which 3 rows hang: the 5 others are scored (each row has its own clock), the
    # hanging ones time out one by one, each reported on its own row.
    cfg = {"weights": {f"{MOD}:faulty_reward": 1.0}}
    texts = ["ok", "HANG", "ok", "HANG", "ok", "ok", "HANG", "ok"]
    with RewardScheduler(cfg, num_workers=1, timeout_s=1.0, chunk_size=8) as sched:
        b = sched.submit(texts, [None] * 8).result(timeout=120)
        assert b.per_function[f"{MOD}:faulty_reward"] == [0.0 if t == "HANG" else 1.0 for t in texts]
        assert b.reasons[f"{MOD}:faulty_reward"] == ["timeout" if t == "HANG" else None for t in texts]
        assert b.metrics["scheduler/failed_rows"] == 3.0
        assert sched.workers_replaced == 3


def test_the_timeout_is_per_row_not_per_chunk():
    # Rows that each take most of the limit: a chunk of them takes far longer than the limit, and all score.
    cfg = {"weights": {f"{MOD}:faulty_reward": 1.0}}
    with RewardScheduler(cfg, num_workers=1, timeout_s=1.0, chunk_size=6) as sched:
        b = sched.submit(["SLOW"] * 6, [None] * 6).result(timeout=120)
        assert b.scores == [1.0] * 6 and sched.workers_replaced == 0


def test_submit_returns_at_once_and_overlaps():
    cfg = {"weights": {f"{MOD}:faulty_reward": 1.0}}
    with RewardScheduler(cfg, num_workers=2, chunk_size=1) as sched:
        sched.score(["ok"], [None], timeout=60)  # workers warm
        t0 = time.monotonic()
        h = sched.submit(["SLOW"] * 4, [None] * 4)
        assert time.monotonic() - t0 < 0.1
        assert not h.done()
        with pytest.raises(TimeoutError):
            h.result(timeout=0.01)
        busy_until = time.monotonic() + 0.5
        while time.monotonic() < busy_until:  # the caller's own work (a rollout) goes on meanwhile
            pass
        b = h.result(timeout=60)
        assert b.scores == [1.0] * 4
        assert time.monotonic() - t0 < 0.5 + 1.2 * 3


def test_bad_config_raises_in_the_caller():
    with pytest.raises(ValueError, match="unknown reward"):
        RewardScheduler({"weights": {"nope": 1.0}}, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardScheduler({"format": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match="unknown reward_config keys"):
        RewardScheduler({"weights": {"format": 1.0}, "wieghts": {}}, num_workers=1)


def test_real_rewards_in_workers_with_helpers_cleaned_up():
    cfg = {
        "weights": {"math_accuracy": 1.0, "code": 1.0},
        "options": {"math_accuracy": {"timeout_s": 1.0}, "code": {"time_limit_s": 1.0}},
    }
    tests = {"tests": [{"input": "2\n", "output": "4\n"}]}
    texts = [
        "<answer>\\frac{8}{2}</answer>\n```python\nprint(int(input()) * 2)\n```",
        "<answer>10^{10^{10^{10}}}</answer>\n```python\nwhile True: pass\n```",
    ]
    refs = [{"math_accuracy": "4", "code": tests}] * 2
    with RewardScheduler(cfg, num_workers=1, timeout_s=30) as sched:
        b = sched.score(texts, refs, timeout=60)
        pids = [s.proc.pid for s in sched._slots]
    assert b.scores == [2.0, 0.0]
    assert b.reasons["math_accuracy"][1] == "timeout" and "timeout" in b.reasons["code"][1]
    assert sched.workers_replaced == 0  # contained inside the worker, which survived
    # Nothing the worker started survives it: its math-verify helper dies with it (PR_SET_PDEATHSIG), and
    # would otherwise show up re-parented (its parent no longer the worker, nor this process).
    for _ in range(40):
        ps = os.popen("ps -eo ppid=,args=").read().splitlines()
        helpers = [line for line in ps if "rewards.isolated import _serve" in line]
        orphans = [h for h in helpers if int(h.split()[0]) != os.getpid()]
        if not orphans:
            break
        time.sleep(0.05)
    assert not orphans
    assert not [line for line in ps if line.split() and line.split()[0] in map(str, pids)]


def test_close_with_work_in_flight_fails_it_with_a_reason():
    sched = RewardScheduler({"weights": {f"{MOD}:faulty_reward": 1.0}}, num_workers=1, timeout_s=60, chunk_size=1)
    h = sched.submit(["HANG", "ok"], [None, None])
    time.sleep(1.0)
    t0 = time.monotonic()
    sched.close()
    assert time.monotonic() - t0 < 10
    b = h.result(timeout=1)
    assert b.reasons[f"{MOD}:faulty_reward"] == ["scheduler closed", "scheduler closed"]
    assert b.scores == [0.0, 0.0]
