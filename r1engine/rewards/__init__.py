"""Rule-based rewards for R1-style RL, a sandbox for model-generated code, and an asynchronous scheduler.

    from r1engine.rewards import get_reward, CombinedReward, RewardScheduler

    fmt = get_reward("format", partial=True)
    fmt(["<think>x</think><answer>4</answer>"], [None])        # [RewardResult(score=1.0, reason=None)]
    combo = CombinedReward({"format": 1.0, "math_accuracy": 1.0})
    with RewardScheduler({"weights": {"format": 1.0, "code": 1.0}}, num_workers=2) as sched:
        handle = sched.submit(completions, references)          # returns at once
        ...                                                     # next rollout / log-prob inference
        batch = handle.result(timeout=60)                       # scores in input order

Modules: ``registry`` (contract + names), ``parsing`` (tags, boxed, code blocks), ``format``,
``math_accuracy`` (math-verify in a killable helper, ``isolated``), ``arithmetic``, ``countdown``,
``language``, ``pattern`` (a regular expression), ``code`` (tests run in ``sandbox``), ``combined``, ``scheduler``.
"""

from __future__ import annotations

from . import arithmetic, code, countdown, format, language, math_accuracy, pattern  # noqa: F401 - registers rewards
from .combined import CombinedResult, CombinedReward, reward_metrics
from .registry import RewardResult, available_rewards, get_reward, register_reward
from .sandbox import SandboxLimits, SandboxResult, run_python, sandbox_strength
from .scheduler import RewardBatch, RewardHandle, RewardScheduler

__all__ = [
    "CombinedResult",
    "CombinedReward",
    "RewardBatch",
    "RewardHandle",
    "RewardResult",
    "RewardScheduler",
    "SandboxLimits",
    "SandboxResult",
    "available_rewards",
    "get_reward",
    "register_reward",
    "reward_metrics",
    "run_python",
    "sandbox_strength",
]
