"""Reward routing: each row scored by its data source's rewards in the real worker processes, per-source means,
custom rewards that receive the row's other fields, correctness for evaluation, and errors naming the route."""

from __future__ import annotations

import math

import pytest

from r1engine.data import Problem
from r1engine.rewards import RewardScheduler
from r1engine.rewards.routing import DEFAULT, RewardRoutes
from r1engine.trainer.evaluation import Correctness

GOOD_CODE = "```python\nimport sys\nprint(int(sys.stdin.readline()) * 2)\n```"
BAD_CODE = "```python\nprint(0)\n```"
CODE_REF = {"tests": [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}]}


def length_bonus(completions, references, **columns):
    """A custom reward in TRL's style: the row's `bonus` column, when the answer is right."""
    return [float(b) if str(r) in c else 0.0 for c, r, b in zip(completions, references, columns["bonus"], strict=True)]


def test_rows_are_scored_by_their_sources_route():
    config = {"weights": {"arithmetic": 1.0, "format": 1.0}, "routes": {"code": {"code": 1.0}}}
    texts = ["<think>x</think><answer>4</answer>", GOOD_CODE, "<answer>5</answer>", BAD_CODE]
    refs = ["4", CODE_REF, "4", CODE_REF]
    with RewardScheduler(config, num_workers=2, chunk_size=1) as sched:
        batch = sched.score(texts, refs, sources=["gsm", "code", "", "code"], timeout=120)
    assert batch.scores == [2.0, 1.0, 0.0, 0.0]
    assert batch.per_function["arithmetic"][:1] == [1.0] and math.isnan(batch.per_function["arithmetic"][1])
    assert math.isnan(batch.per_function["code"][0]) and batch.per_function["code"][1] == 1.0
    assert batch.metrics["reward/source/code/mean"] == 0.5 and batch.metrics["reward/source/gsm/mean"] == 2.0
    assert batch.metrics["reward/source/default/mean"] == 0.0
    assert batch.metrics["code/mean"] == 0.5  # over the rows the code reward scored


def test_custom_reward_receives_the_rows_columns():
    config = {"weights": {f"{__name__}:length_bonus": 1.0}}
    with RewardScheduler(config, num_workers=1) as sched:
        batch = sched.submit(["it is 4", "it is 5"], ["4", "4"], columns={"bonus": [0.5, 0.7]}).result(60)
    assert batch.scores == [0.5, 0.0]


def test_routes_without_a_default_name_the_source():
    routes = RewardRoutes({}, {"gsm8k": {"math_accuracy": 1.0}})
    assert routes.route_of("gsm8k") == "gsm8k"
    with pytest.raises(ValueError, match="no route for data source 'mbpp' and no default route"):
        routes.check_sources({"gsm8k", "mbpp"})
    with pytest.raises(ValueError, match="rewards.routes.x: a route needs at least one reward"):
        RewardRoutes({"format": 1.0}, {"x": {}})
    assert RewardRoutes({"format": 1.0}).route_of("anything") == DEFAULT


def test_correctness_ignores_shaping_rewards():
    routes = RewardRoutes({"math_accuracy": 1.0, "format": 1.0}, {"cd": {"countdown": 1.0, "format": 0.5}})
    assert routes.correctness().weights(DEFAULT) == {"math_accuracy": 1.0}
    correct = Correctness(routes)
    problems = [Problem("q", "1/2", "gsm"), Problem("q", {"numbers": [3, 4], "target": 7}, "cd")]
    assert correct(["<answer>0.5</answer>", "<answer>3 + 4</answer>"], problems) == [1.0, 1.0]  # no think: fine
    assert correct(["<answer>0.4</answer>", "<answer>3 * 4</answer>"], problems) == [0.0, 0.0]
