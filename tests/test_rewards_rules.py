"""Pure-Python rewards: format, arithmetic, countdown, language consistency; registry and CombinedReward."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from r1engine.rewards import CombinedReward, RewardResult, available_rewards, get_reward
from r1engine.rewards.countdown import ExpressionError, evaluate_expression
from r1engine.rewards.parsing import extract_answer, extract_last_boxed, parse_number

GOOD = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"


# ------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize(
    "text,score,reason",
    [
        (GOOD, 1.0, None),
        ("<think>a</think><answer>b</answer>", 1.0, None),
        ("  \n<think>a</think>\n\n<answer>b</answer>\n  ", 1.0, None),
        ("<think>a</think><answer>b</answer> trailing", 0.0, "text after </answer>"),
        ("<think>a</think><answer>b</answer>\ntrailing line", 0.0, "text after </answer>"),
        ("hello <think>a</think><answer>b</answer>", 0.0, "text before <think>"),
        ("<think>a</think> so <answer>b</answer>", 0.0, "text between </think> and <answer>"),
        ("<think>a</think>", 0.0, "missing <answer>"),
        ("<answer>b</answer>", 0.0, "missing <think>"),
        ("<think>a<answer>b</answer>", 0.0, "missing </think>"),
        ("<think>a</think><answer>b", 0.0, "missing </answer>"),
        ("<think>a<think>b</think></think><answer>c</answer>", 0.0, "repeated <think>"),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0, "repeated <answer>"),
        ("<think>a<answer>x</answer></think><answer>b</answer>", 0.0, "repeated <answer>"),
        ("<answer>b</answer><think>a</think>", 0.0, "tags out of order"),
        ("<think>   </think><answer>b</answer>", 0.0, "empty <think>"),
        ("<think>a</think><answer> </answer>", 0.0, "empty <answer>"),
        ("", 0.0, "missing <think>"),
    ],
)
def test_format_strict(text, score, reason):
    (r,) = get_reward("format")([text], [None])
    assert r == RewardResult(score, reason)


def test_format_partial_credit_and_options():
    partial = get_reward("format", partial=True)
    texts = [GOOD, "<think>a</think>", "<think>a</think><answer>b</answer> x", "nothing", "<think><think></think>"]
    # a template with trailing text still earns 4 x 0.25 in partial mode, and the reason says why
    assert [r.score for r in partial(texts, [None] * 5)] == [1.0, 0.5, 1.0, 0.0, 0.25]
    assert partial([texts[2]], [None])[0].reason == "text after </answer>"
    tip = get_reward("format", think_in_prompt=True)
    assert tip(["reasoning</think><answer>4</answer>"], [None])[0].score == 1.0
    assert tip(["<think>reasoning</think><answer>4</answer>"], [None])[0].reason == "repeated <think>"
    empty_ok = get_reward("format", allow_empty_think=True)
    assert empty_ok(["<think></think><answer>4</answer>"], [None])[0].score == 1.0


def test_format_huge_input_is_fast():
    t0 = time.monotonic()
    (r,) = get_reward("format")(["<think>" + "a<" * 500_000 + "</think><answer>1</answer>"], [None])
    assert r.score == 1.0
    (r,) = get_reward("format")(["<think>" * 100_000], [None])
    assert r.score == 0.0
    assert time.monotonic() - t0 < 2.0


# ------------------------------------------------------------------------------------------ parsing
def test_parsing_helpers():
    assert extract_last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert extract_last_boxed("\\boxed{unclosed") is None
    assert extract_last_boxed("\\boxed 5") == "5"
    assert extract_answer("<answer>a</answer><answer> b </answer>") == "b"
    assert extract_answer("<answer>so \\boxed{3}</answer>") == "3"
    assert extract_answer("nothing") is None
    assert parse_number("1,234.5") == Fraction(24690, 20)
    assert parse_number("-\\frac{3}{4}") == Fraction(-3, 4)
    assert parse_number("$7/8$") == Fraction(7, 8)
    assert parse_number("1/0") is None and parse_number("2x") is None and parse_number("1" * 200) is None


# ------------------------------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize(
    "answer,ref,score",
    [
        ("12", 12, 1.0),
        (" 12 ", "12", 1.0),
        ("12.0", 12, 1.0),
        ("-3", -3, 1.0),
        ("3/4", Fraction(3, 4), 1.0),
        ("0.75", Fraction(3, 4), 1.0),
        ("\\frac{3}{4}", "3/4", 1.0),
        ("1,000", 1000, 1.0),
        ("13", 12, 0.0),
        ("12.5", 12, 0.0),
    ],
)
def test_arithmetic(answer, ref, score):
    (r,) = get_reward("arithmetic")([f"<think>t</think><answer>{answer}</answer>"], [ref])
    assert r.score == score and r.reason is None


@pytest.mark.parametrize(
    "answer",
    ["2**2**2**100", "10^{10^{10}}", "__import__('os').system('true')", "1e309", "12 apples", "9" * 1000, "(" * 5000],
)
def test_arithmetic_hostile(answer):
    t0 = time.monotonic()
    (r,) = get_reward("arithmetic")([f"<answer>{answer}</answer>"], [12])
    assert r.score == 0.0 and r.reason.startswith("parse error")
    assert time.monotonic() - t0 < 0.5


def test_arithmetic_random_exact():
    rng = random.Random(1234)
    refs = [Fraction(rng.randint(-999, 999), rng.randint(1, 40)) for _ in range(200)]
    texts = [f"<answer>{x.numerator}/{x.denominator}</answer>" for x in refs]
    assert all(r.score == 1.0 for r in get_reward("arithmetic")(texts, refs))
    shifted = [x + Fraction(1, 97) for x in refs]
    assert all(r.score == 0.0 for r in get_reward("arithmetic")(texts, shifted))
    assert get_reward("arithmetic")(["no tags"], [1])[0].reason == "no <answer> tag"
    with pytest.raises(ValueError, match="reference"):
        get_reward("arithmetic")(["<answer>1</answer>"], ["x"])


# ------------------------------------------------------------------------------------------ countdown
REF = {"numbers": [3, 7, 25, 50], "target": 82}


@pytest.mark.parametrize(
    "answer,score,reason",
    [
        ("50 + 25 + 7", 1.0, None),
        ("(50 + 25) + 7", 1.0, None),
        ("50+25+7 = 82", 1.0, None),
        ("50 + 25 + 7 + 3 - 3", 0.0, "uses numbers not given (or more than once): [3]"),
        ("50 + 25 + 7 + 0", 0.0, "uses numbers not given (or more than once): [0]"),
        ("50 + 25 + 3", 0.0, "evaluates to 78"),
        ("50 * 50", 0.0, "uses numbers not given (or more than once): [50]"),
        ("7 / (3 - 3)", 0.0, "division by zero"),
        ("50 / (25 - 25)", 0.0, "division by zero"),
        ("3 ** 7", 0.0, "operator Pow not allowed"),
        ("50 + 25 + 7.0", 0.0, "only integer literals allowed, got 7.0"),
        ("__import__('os').system('touch /tmp/pwned')", 0.0, "Call not allowed"),
        ("().__class__", 0.0, "Attribute not allowed"),
        ("x + 7", 0.0, "Name not allowed"),
        ("50 if 1 else 7", 0.0, "IfExp not allowed"),
        ("50 // 25", 0.0, "operator FloorDiv not allowed"),
        ("lambda: 1", 0.0, "Lambda not allowed"),
        ("50 +", 0.0, "parse error: SyntaxError"),
    ],
)
def test_countdown(answer, score, reason):
    (r,) = get_reward("countdown")([f"<think>t</think><answer>{answer}</answer>"], [REF])
    assert r == RewardResult(score, reason)


def test_countdown_exact_fractions_and_options():
    ref = ([1, 3, 4, 6], 24)
    (r,) = get_reward("countdown")(["<answer>6 / (1 - 3/4)</answer>"], [ref])  # needs exact 1/4
    assert r.score == 1.0
    (r,) = get_reward("countdown", use_all=True)(["<answer>6 * 4</answer>"], [ref])
    assert r.score == 0.0 and r.reason.startswith("does not use every number")
    (r,) = get_reward("countdown", use_all=True)(["<answer>6 / (1 - 3/4)</answer>"], [ref])
    assert r.score == 1.0
    pw = get_reward("countdown", allow_pow=True)
    assert pw(["<answer>2 ** 3</answer>"], [([2, 3], 8)])[0].score == 1.0
    t0 = time.monotonic()
    for hostile in ("44**19**35", "9**9**9**9", "2**100000", "(2**16)**(2**16)"):
        (r,) = pw([f"<answer>{hostile}</answer>"], [([44, 19, 35, 9, 2, 16, 100000], 1)])
        assert r.score == 0.0 and "guard" in r.reason
    assert time.monotonic() - t0 < 0.5


def test_countdown_hostile_sizes():
    t0 = time.monotonic()
    deep = "(" * 100_000 + "1" + ")" * 100_000
    for ans in (deep, "1+" * 200_000 + "1", "-" * 300 + "1"):
        (r,) = get_reward("countdown")([f"<answer>{ans}</answer>"], [([1], 1)])
        assert r.score in (0.0, 1.0) and (r.score == 1.0 or r.reason)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ExpressionError):
        evaluate_expression("open('x')")


def _random_expr(rng: random.Random, depth: int) -> tuple[str, Fraction | None, list[int]]:
    """A random expression string, its exact value (None if it divides by zero) and its literals."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(1, 99)
        return str(n), Fraction(n), [n]
    a, va, la = _random_expr(rng, depth - 1)
    b, vb, lb = _random_expr(rng, depth - 1)
    op = rng.choice("+-*/")
    if va is None or vb is None or (op == "/" and vb == 0):
        v = None
    else:
        v = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
    return f"({a} {op} {b})", v, la + lb


def test_countdown_random_against_fraction_oracle():
    rng = random.Random(7)
    for _ in range(300):
        expr, value, lits = _random_expr(rng, 4)
        if value is None:
            with pytest.raises(ExpressionError, match="division by zero"):
                evaluate_expression(expr)
            continue
        got, used = evaluate_expression(expr)
        assert got == value and sorted(used) == sorted(lits)
        (r,) = get_reward("countdown", use_all=True)([f"<answer>{expr}</answer>"], [(lits, value)])
        assert r.score == 1.0


# ------------------------------------------------------------------------------------------ language
@pytest.mark.parametrize(
    "think,lang,score",
    [
        ("Let me add the two numbers carefully", "en", 1.0),
        ("我们先把两个数相加", "zh", 1.0),
        ("我们先把两个数相加", "en", 0.0),
        ("first 我们 then", "en", 0.5),  # 2 Latin words vs 2 CJK characters
        ("first 我们 then", "zh", 0.5),
        ("x = \\frac{1}{2} so the answer is 12", "en", 1.0),  # LaTeX commands and digits are not words
        ("Привет world", "en", 0.5),
    ],
)
def test_language_consistency(think, lang, score):
    (r,) = get_reward("language_consistency", language=lang)([f"<think>{think}</think><answer>1</answer>"], [None])
    assert r.score == pytest.approx(score)


def test_language_consistency_edges():
    lc = get_reward("language_consistency")
    assert lc(["<answer>1</answer>"], [None])[0].reason == "no <think> section"
    assert lc(["<think> 1 + 2 = 3 </think>"], [None])[0].reason == "no words in <think>"
    assert lc(["<think>我们</think>"], ["zh"])[0].score == 1.0  # per-sample target from the reference
    assert get_reward("language_consistency", think_in_prompt=True)(["hello world</think>"], [None])[0].score == 1.0
    with pytest.raises(ValueError, match="language"):
        get_reward("language_consistency", language="fr")


# ------------------------------------------------------------------------------------------ registry / combined
def test_registry():
    names = available_rewards()
    for n in ("format", "math_accuracy", "arithmetic", "countdown", "language_consistency", "code"):
        assert n in names
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(TypeError):
        get_reward("format", bogus=1)


def _boom(completions, references):
    raise RuntimeError("kaboom")


def test_combined_reward_weights_metrics_and_failure():
    combo = CombinedReward(
        {"format": 1.0, "arithmetic": 2.0, "test_rewards_rules:_boom": 0.5},
        {"format": {"partial": True}},
        failure_value=-1.0,
    )
    texts = [GOOD, "<answer>4</answer>", "<think>x</think><answer>5</answer>"]
    res = combo.evaluate(texts, [4, 4, 4])
    assert res.scores == [1.0 + 2.0 - 0.5, 0.5 + 2.0 - 0.5, 1.0 + 0.0 - 0.5]
    assert res.per_function["test_rewards_rules:_boom"][0].reason == "error: RuntimeError: kaboom"
    m = res.metrics
    assert m["arithmetic/pass_rate"] == pytest.approx(2 / 3)
    assert m["format/mean"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert m["test_rewards_rules:_boom/errors"] == 3.0
    assert m["reward/mean"] == pytest.approx(sum(res.scores) / 3)
    # per-function references
    c2 = CombinedReward({"arithmetic": 1.0, "countdown": 1.0})
    refs = [{"arithmetic": 82, "countdown": REF}]
    assert c2.evaluate(["<answer>50+25+7</answer>"], refs).per_function["countdown"][0].score == 1.0
    with pytest.raises(ValueError, match="options given"):
        CombinedReward({"format": 1.0}, {"arithmetic": {}})


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * 200_000,
        "<think>" * 100_000 + "</think>" * 100_000,
        "```python\n" * 200_000,
        "\\boxed{" * 200_000,
        "<answer>" + "(" * 200_000 + "</answer>",
    ],
)
def test_pathological_tag_soup_is_linear(text):
    # A regex like <answer>(.*?)</answer> takes minutes on thousands of unclosed tags; every reward must not.
    t0 = time.monotonic()
    for name in ("format", "arithmetic"):
        (r,) = get_reward(name)([text], [1])
        assert r.score == 0.0 and r.reason
    get_reward("language_consistency")([text], [None])  # "think" tags are Latin words: any score, but fast
    (r,) = get_reward("countdown")([text], [([1], 1)])
    assert r.score == 0.0 and r.reason
    assert time.monotonic() - t0 < 3.0
