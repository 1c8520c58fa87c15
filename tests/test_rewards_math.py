"""math_accuracy: a table of equivalent / non-equivalent answer pairs, extraction rules, hostile answers."""

from __future__ import annotations

import time

import pytest

from r1engine.rewards import get_reward
from r1engine.rewards.math_accuracy import MathAccuracyReward

# (reference, extracted answer as the model writes it, expected score)
PAIRS = [
    # integers and signs
    ("42", "42", 1.0),
    ("42", "42.0", 1.0),
    ("42", "43", 0.0),
    ("-7", "-7", 1.0),
    ("-7", "7", 0.0),
    ("1000", "1,000", 1.0),
    ("0", "0", 1.0),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", 1.0),
    ("\\frac{1}{2}", "\\frac{2}{4}", 1.0),
    ("\\frac{1}{2}", "\\tfrac{1}{2}", 1.0),
    ("\\frac{1}{2}", "0.6", 0.0),
    ("\\frac{1}{3}", "0.333333", 1.0),
    ("\\frac{1}{3}", "0.3", 0.0),
    ("0.25", "\\frac{1}{4}", 1.0),
    ("0.25", "25\\%", 1.0),
    ("3/4", "0.75", 1.0),
    ("3/4", "4/3", 0.0),
    ("-\\frac{3}{2}", "-1.5", 1.0),
    ("-\\frac{3}{2}", "1.5", 0.0),
    ("2.50", "2.5", 1.0),
    # percentages
    ("50\\%", "0.5", 1.0),
    ("50\\%", "50\\%", 1.0),
    ("50\\%", "0.05", 0.0),
    # roots, pi, powers
    ("\\sqrt{2}", "\\sqrt{2}", 1.0),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\sqrt{8}", "2\\sqrt{2}", 1.0),
    ("\\sqrt{8}", "3\\sqrt{2}", 0.0),
    ("2\\sqrt{3}", "\\sqrt{12}", 1.0),
    ("\\sqrt{2}", "1.41421356", 1.0),
    ("\\pi", "\\pi", 1.0),
    ("2\\pi", "6.283185", 1.0),
    ("2\\pi", "\\pi", 0.0),
    ("\\frac{\\pi}{2}", "\\pi/2", 1.0),
    ("2^{10}", "1024", 1.0),
    ("2^{10}", "1000", 0.0),
    ("e^{2}", "e^2", 1.0),
    ("10^{-3}", "0.001", 1.0),
    # expressions
    ("x+1", "1+x", 1.0),
    ("x^2-1", "(x-1)(x+1)", 1.0),
    ("x^2-1", "(x-1)^2", 0.0),
    ("2x", "x+x", 1.0),
    ("\\frac{x}{2}", "0.5x", 1.0),
    # sets, intervals, tuples
    ("\\{1,2,3\\}", "\\{3,2,1\\}", 1.0),
    ("\\{1,2,3\\}", "\\{1,2\\}", 0.0),
    ("(1,2)", "(1,2)", 1.0),
    ("(1,2)", "(2,1)", 0.0),
    ("[0,1]", "[0,1]", 1.0),
    ("[0,1]", "(0,1)", 0.0),
    # text / units / assignments
    ("5", "\\text{5}", 1.0),
    ("5", "x = 5", 1.0),
    ("12", "12 \\text{ cm}", 1.0),
    ("3", "$3$", 1.0),
    ("\\frac{9}{7}", "\\dfrac{9}{7}", 1.0),
    ("\\frac{9}{7}", "\\frac{7}{9}", 0.0),
    ("1+2i", "2i+1", 1.0),
    ("1+2i", "1-2i", 0.0),
]


@pytest.fixture(scope="module")
def math_reward():
    r = MathAccuracyReward(timeout_s=10.0)
    yield r
    r.close()


def test_table_has_50_pairs_both_kinds():
    assert len(PAIRS) >= 50
    assert sum(1 for p in PAIRS if p[2] == 1.0) >= 20 and sum(1 for p in PAIRS if p[2] == 0.0) >= 15


def test_answer_pairs_table(math_reward):
    completions = [f"<think>work</think><answer>{a}</answer>" for _, a, _ in PAIRS]
    res = math_reward(completions, [r for r, _, _ in PAIRS])
    wrong = [(p, r) for p, r in zip(PAIRS, res, strict=True) if r.score != p[2]]
    assert not wrong, f"{len(wrong)} mismatches: {wrong}"
    # the fast path and math-verify agree where both apply
    slow = MathAccuracyReward(timeout_s=10.0, fast_path=False)
    plain = [(r, a, e) for r, a, e in PAIRS if r.lstrip("-").isdigit() and a.lstrip("-").isdigit()]
    res_slow = slow([f"<answer>{a}</answer>" for _, a, _ in plain], [r for r, _, _ in plain])
    slow.close()
    assert [x.score for x in res_slow] == [e for _, _, e in plain]


@pytest.mark.parametrize(
    "completion,score,reason",
    [
        ("<think>...</think><answer>The answer is \\boxed{7}.</answer>", 1.0, None),
        ("so the result is \\boxed{7}", 1.0, None),
        ("first \\boxed{3} then corrected: \\boxed{7}", 1.0, None),
        ("\\boxed{\\frac{14}{2}}", 1.0, None),
        ("<answer>7</answer> but also \\boxed{8}", 1.0, None),
        ("the answer is 7", 0.0, "no <answer> tag or \\boxed{}"),
        ("<answer></answer>", 0.0, "empty answer"),
        ("<answer>banana</answer>", 0.0, None),
    ],
)
def test_extraction(math_reward, completion, score, reason):
    (r,) = math_reward([completion], ["7"])
    assert r.score == score
    if reason is not None:
        assert r.reason == reason


@pytest.mark.parametrize(
    "answer",
    ["2**2**2**100", "10^{10^{10^{10}}}", "9^{9^{9^{9^{9}}}}", "(10^{10^{10}})!", "2^{2^{2^{2^{2^{2^{2}}}}}}"],
)
def test_hostile_answers_never_stall(math_reward, answer):
    t0 = time.monotonic()
    math_reward.timeout_s = 1.0
    try:
        (r,) = math_reward([f"<answer>{answer}</answer>"], ["3"])
    finally:
        math_reward.timeout_s = 10.0
    assert r.score == 0.0
    assert time.monotonic() - t0 < 8.0
    # the helper is still usable afterwards (replaced if it was killed)
    (ok,) = math_reward(["<answer>\\frac{6}{2}</answer>"], ["3"])
    assert ok.score == 1.0


def test_megabyte_answer_rejected_fast(math_reward):
    t0 = time.monotonic()
    (r,) = math_reward(["<answer>" + "1" * (1 << 20) + "</answer>"], ["1"])
    assert r.score == 0.0 and r.reason.startswith("answer too long")
    (r2,) = math_reward(["\\boxed{" + "{" * 100000 + "}" * 100000 + "}"], ["1"])
    assert r2.score == 0.0
    assert time.monotonic() - t0 < 5.0


def test_registry_and_bad_input():
    r = get_reward("math_accuracy", timeout_s=3.0)
    assert isinstance(r, MathAccuracyReward)
    with pytest.raises(ValueError, match="timeout_s"):
        get_reward("math_accuracy", timeout_s=0)
    with pytest.raises(ValueError, match="same length"):
        r(["<answer>1</answer>"], [])
    assert r(["<answer>1</answer>"], [None])[0].reason == "no reference"
    r.close()
