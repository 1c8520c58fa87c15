"""Benchmark: overlapping slow rewards with the rollout (RewardScheduler) vs computing them after it.

Reward: the ``code`` reward on programs that each run one test case burning 100-500 ms of CPU time
(``time.process_time``; drawn per sample, fixed seed) in the sandbox, plus the ``format`` reward.
Rollout stand-in: a fixed amount of single-threaded fp32 matmul work shaped like a tiny decoder's
forward passes (hidden 512, 4 layers, MLP 4x, 64 tokens per pass), calibrated at start-up to take
about as long as one batch's rewards.

- baseline ("sequential"): each step runs the rollout, then scores its batch in-process (CombinedReward);
- overlapped: each step submits its batch to RewardScheduler(num_workers=1) and runs the next rollout
  while the worker scores it (the R1 paper's asynchronous reward scheduling).
The ratio is sequential step time / overlapped step time (2 cores: the rollout takes one, the reward
worker and its sandboxed program the other; ideal 2x when reward time == rollout time). Then rewards per
second of the scheduler alone against the number of workers.

    python benchmarks/bench_rewards.py [--batch 8] [--steps 4] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

from r1engine.rewards import CombinedReward, RewardScheduler, sandbox_strength

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

# A generous per-test limit: on a loaded shared machine a 500 ms-CPU program can take several seconds of
# wall time, and this benchmark measures throughput, not the timeout path.
CONFIG = {"weights": {"code": 1.0, "format": 0.1}, "options": {"code": {"time_limit_s": 30.0}}}


def _check(scores, reasons, where: str) -> None:
    bad = [(i, r) for i, (s, r) in enumerate(zip(scores, reasons, strict=True)) if s < 1.0]
    if bad:
        print(f"  WARNING {where}: {len(bad)} samples not passing: {bad[:3]}")


def make_batch(n: int, seed: int, lo_ms: int = 100, hi_ms: int = 500) -> tuple[list[str], list[dict], float]:
    """n completions whose program burns lo..hi ms of CPU then answers; returns (texts, refs, total CPU s)."""
    rng = random.Random(seed)
    texts, refs, total = [], [], 0.0
    for _ in range(n):
        ms = rng.randint(lo_ms, hi_ms)
        total += ms / 1000
        prog = (
            "import time\nn = int(input())\nend = time.process_time() + %.3f\n"
            "while time.process_time() < end:\n    pass\nprint(n * 2)\n" % (ms / 1000)
        )
        x = rng.randint(1, 1000)
        texts.append(f"<think>busy {ms} ms</think>\n<answer>\n```python\n{prog}```\n</answer>")
        refs.append({"code": {"tests": [{"input": f"{x}\n", "output": f"{2 * x}\n"}]}, "format": None})
    return texts, refs, total


class Rollout:
    """Fixed CPU-busy stand-in for generation: matmuls of a tiny decoder's size, one thread."""

    def __init__(self, hidden: int = 512, layers: int = 4, tokens: int = 64):
        g = torch.Generator().manual_seed(0)
        self.w = [
            (torch.randn(hidden, 4 * hidden, generator=g) * 0.02, torch.randn(4 * hidden, hidden, generator=g) * 0.02)
            for _ in range(layers)
        ]
        self.x = torch.randn(tokens, hidden, generator=g)
        self.passes = 1

    def one_pass(self) -> torch.Tensor:
        h = self.x
        for w1, w2 in self.w:
            h = h + torch.relu(h @ w1) @ w2 * 0.1
        return h

    def calibrate(self, seconds: float) -> None:
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.5:
            self.one_pass()
            n += 1
        per = (time.perf_counter() - t0) / n
        self.passes = max(1, int(seconds / per))

    def __call__(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.passes):
            self.one_pass()
        return time.perf_counter() - t0


def run_sequential(rollout: Rollout, batches, steps: int) -> tuple[float, float, float]:
    reward = CombinedReward(CONFIG["weights"], CONFIG["options"])
    t_roll = t_rew = 0.0
    t0 = time.perf_counter()
    for s in range(steps):
        t_roll += rollout()
        t1 = time.perf_counter()
        res = reward.evaluate(*batches[s % len(batches)][:2])
        t_rew += time.perf_counter() - t1
        _check(res.scores, [r.reason for r in res.per_function["code"]], "sequential")
    return (time.perf_counter() - t0) / steps, t_roll / steps, t_rew / steps


def run_overlapped(rollout: Rollout, batches, steps: int) -> tuple[float, float]:
    with RewardScheduler(CONFIG, num_workers=1, chunk_size=len(batches[0][0])) as sched:
        sched.score(["x"], [{"code": {"tests": [{"input": "", "output": ""}]}, "format": None}], timeout=120)  # warm
        t0 = time.perf_counter()
        pending = None
        wait = 0.0
        for s in range(steps + 1):
            handle = sched.submit(*batches[s % len(batches)][:2]) if s < steps else None
            if s < steps:
                rollout()  # the next step's rollout runs while the worker scores batch s
            if pending is not None:
                t1 = time.perf_counter()
                res = pending.result(timeout=300)
                wait += time.perf_counter() - t1
                _check(res.scores, res.reasons["code"], "overlapped")
            pending = handle
        total = time.perf_counter() - t0
    # the same work as run_sequential: `steps` rollouts and `steps` reward batches
    return total / steps, wait / steps


def rewards_per_second(workers: int, n: int, seed: int) -> float:
    texts, refs, _ = make_batch(n, seed, 100, 300)
    with RewardScheduler(CONFIG, num_workers=workers, chunk_size=1) as sched:
        sched.score(texts[:workers], refs[:workers], timeout=120)  # warm every worker
        t0 = time.perf_counter()
        res = sched.score(texts, refs, timeout=600)
        dt = time.perf_counter() - t0
    _check(res.scores, res.reasons["code"], f"throughput workers={workers}")
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="completions per step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--throughput-n", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"# bench_rewards  {time.strftime('%Y-%m-%d %H:%M')}  commit {git_commit()}  {cpu_name()}"
        f"  cores={os.cpu_count()}  load={os.getloadavg()[0]:.1f}  sandbox={sandbox_strength()}"
    )
    batches = [make_batch(args.batch, seed) for seed in range(3)]
    busy = sum(b[2] for b in batches) / len(batches)
    # measure real reward time of one batch in-process, then size the rollout to match it
    reward = CombinedReward(CONFIG["weights"], CONFIG["options"])
    t0 = time.perf_counter()
    reward.evaluate(*batches[0][:2])
    reward_s = time.perf_counter() - t0
    rollout = Rollout()
    rollout.calibrate(reward_s)
    print(
        f"batch={args.batch} programs busy {busy:.2f}s/batch, measured reward time {reward_s:.2f}s, "
        f"rollout calibrated to {rollout.passes} passes"
    )
    seq, roll, rew = run_sequential(rollout, batches, args.steps)
    ovl, wait = run_overlapped(rollout, batches, args.steps)
    print(f"sequential (baseline): {seq:.2f} s/step (rollout {roll:.2f} + rewards {rew:.2f})")
    print(f"overlapped (RewardScheduler, 1 worker): {ovl:.2f} s/step (waiting on rewards {wait:.2f} s/step)")
    print(f"speedup: {seq / ovl:.2f}x   (ideal for equal halves on 2 free cores: 2.00x)")
    print("rewards/second vs workers (programs burn 100-300 ms CPU each, no rollout running):")
    base = None
    for w in [int(x) for x in args.workers.split(",")]:
        rps = rewards_per_second(w, args.throughput_n, seed=11)
        base = base or rps
        print(f"  workers={w}: {rps:.2f} rewards/s  ({rps / base:.2f}x vs 1 worker)")


if __name__ == "__main__":
    main()
