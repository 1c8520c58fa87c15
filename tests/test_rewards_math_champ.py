"""math_accuracy on real competition answers (CHAMP, from the champ-dataset package) and on plain ASCII notation.

CHAMP's reference answers are written in plain notation (``2^(n-1)``, ``sqrt(3)/3``, ``C(10, 5)``), the way small
models write theirs, so they exercise the plain-notation path on both sides of the comparison.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
from sympy import Basic

from r1engine.rewards.math_accuracy import MathAccuracyReward, parse_answer, plain_to_latex

try:
    import champ_dataset
except ImportError:
    champ_dataset = None

needs_champ = pytest.mark.skipif(champ_dataset is None, reason="champ-dataset is not installed")

# References math-verify cannot turn into a SymPy object (it falls back to the normalised string, so they still
# match themselves exactly, and nothing else). 249 of the 270 parse.
_PROSE = [  # prose in parentheses after the value: "100 (i.e., all values)", "0 (i.e., no such values)"
    *("P_Inequality_14", "P_Inequality_25", "P_Inequality_35", "P_Inequality_39", "P_Inequality_48"),
    *("P_Polynomial_3", "P_Polynomial_8", "P_Polynomial_16", "P_Polynomial_27", "P_Polynomial_28", "P_Polynomial_42"),
    *("P_Sequence_6", "P_Sequence_9", "P_Sequence_22", "P_Sequence_27", "P_Sequence_35", "P_Sequence_39"),
    "P_Sequence_50",
]
UNPARSED = dict.fromkeys(_PROSE, "prose remark") | {
    # "a(1±sqrt(2)), a(1±sqrt(5))/2": latex2sympy reads \pm only at the top of an expression, not in a product
    "P_Polynomial_2": "± inside a product",
    # "x(x-1)(x-2)...(x-2022)", "Yes, and the sequence is 1/2^3, 1/2^6, 1/2^9, ...": an elided pattern
    "P_Polynomial_46": "ellipsis",
    "P_Sequence_43": "ellipsis",
}


@pytest.fixture(scope="module")
def champ() -> list[tuple[str, str]]:
    path = resources.files("champ_dataset") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return [(pid, p["_answer"]) for pid, p in problems.items()]


@pytest.fixture(scope="module")
def math_reward():
    r = MathAccuracyReward(timeout_s=10.0)
    yield r
    r.close()


def _failures(reward, completions, references, expected):
    res = reward(completions, references)
    return [(c, ref, r) for c, ref, r in zip(completions, references, res, strict=True) if r.score != expected]


@needs_champ
def test_champ_references_parse(champ):
    assert len(champ) == 270
    unparsed = {pid: ref for pid, ref in champ if not any(isinstance(x, Basic) for x in parse_answer(ref))}
    assert set(unparsed) == set(UNPARSED), sorted(set(unparsed) ^ set(UNPARSED))
    assert len(champ) - len(unparsed) == 249


@needs_champ
def test_champ_references_match_themselves(champ, math_reward):
    refs = [ref for _, ref in champ]
    assert not _failures(math_reward, [f"<answer>{ref}</answer>" for ref in refs], refs, 1.0)
    assert not _failures(math_reward, [f"<think>so</think> \\boxed{{{ref}}}" for ref in refs], refs, 1.0)


def _perturb(ref: str) -> str:
    """A wrong answer close to ``ref``: its first number plus one, Yes/No swapped, or "+1" appended."""
    if ref in ("Yes", "No"):
        return "No" if ref == "Yes" else "Yes"
    m = re.search(r"\d+", ref)
    if m is None:
        return ref + "+1"
    return ref[: m.start()] + str(int(m.group()) + 1) + ref[m.end() :]


@needs_champ
def test_champ_perturbed_answers_score_zero(champ, math_reward):
    refs = [ref for _, ref in champ]
    wrong = [_perturb(ref) for ref in refs]
    assert all(w != r for w, r in zip(wrong, refs, strict=True))
    assert not _failures(math_reward, [f"<answer>{w}</answer>" for w in wrong], refs, 0.0)


# (LaTeX form, plain form) of the same answer; most are CHAMP references (problem id in the comment).
EQUIVALENT = [
    ("\\frac{1}{2}", "1/2"),  # P_Inequality_2
    ("2^{n-1}", "2^(n-1)"),  # P_Combinatorics_6
    ("\\sqrt{2}", "sqrt(2)"),  # P_Inequality_34
    ("\\sqrt{2}", "√2"),
    ("\\binom{n}{4}", "C(n, 4)"),  # P_Combinatorics_29
    ("\\binom{n}{4}", "n(n-1)(n-2)(n-3)/4!"),  # P_Combinatorics_29
    ("\\binom{10}{5}", "252"),  # P_Combinatorics_2
    ("252", "C(10, 5)"),  # P_Combinatorics_2
    ("\\binom{n}{2}", "n choose 2"),
    ("\\binom{n}{2}", "n(n-1)/2"),
    ("\\frac{n(n-3)}{2}", "n(n-3)/2"),  # P_Combinatorics_11
    ("(n+1)^{n-1}", "(n+1)^(n-1)"),  # P_Combinatorics_12
    ("n(n+1)2^{n-2}", "n(n+1)*2^(n-2)"),  # P_Combinatorics_19
    ("\\frac{4^n+2^n}{2}", "(4^n+2^n)/2"),  # P_Combinatorics_23
    ("\\frac{(2n)!}{2^n n!}", "(2n)!/(2^n*n!)"),  # P_Combinatorics_35
    ("\\frac{n!}{2n}", "n!/(2n)"),  # P_Combinatorics_36
    ("2^{\\lfloor n/2 \\rfloor}\\lfloor n/2 \\rfloor!", "2^floor(n/2)*floor(n/2)!"),  # P_Combinatorics_3
    ("\\sum_{i=1}^{n} i^2", "sum_(i=1)^n i^2"),  # P_Combinatorics_37
    ("1-\\frac{1}{\\sqrt[n]{2}}", "1-1/2^(1/n)"),  # P_Inequality_17
    ("1-2^{-1/n}", "1-1/2^(1/n)"),  # P_Inequality_17
    ("\\frac{1}{\\sqrt{3}}", "sqrt(3)/3"),  # P_Inequality_18
    ("\\frac{\\sqrt{3}}{3}", "1/sqrt(3)"),  # P_Inequality_18
    ("\\frac{n^2}{n-1}", "n^2/(n-1)"),  # P_Inequality_31
    ("\\frac{1+\\sqrt{4a+1}}{2}", "(1+sqrt(4a+1))/2"),  # P_Sequence_41
    ("\\frac{(-1)^{n+1}+n+1}{n+2}", "((-1)^(n+1)+n+1)/(n+2)"),  # P_Polynomial_28
    ("\\frac{20\\cdot 10^{15}-2}{17}", "(20*10^15-2)/17"),  # P_Number-Theory_51
    ("1176470588235294", "(20*10^15-2)/17"),  # P_Number-Theory_51
    ("2^{997}", "2^997"),  # P_Sequence_34
    ("x=\\pm 1", "x=±1"),  # P_Polynomial_22
    ("x=\\pm 1, \\pm 2, \\pm \\frac{1}{2}", "x=±1, ±2, ±1/2"),  # P_Polynomial_38
    ("x^4+x^2+1", "(x^2+x+1)(x^2-x+1)"),  # P_Polynomial_14
    ("\\sqrt{(a+c)(b+d)}", "sqrt((a+c)(b+d))"),  # from a CHAMP solution: nested parentheses
    ("2^{n(n-1)/2}", "2^(n(n-1)/2)"),
    ("2^{\\frac{n+1}{2}}", "2^((n+1)/2)"),
    ("\\frac{3\\pi}{4}", "3*pi/4"),
    ("\\frac{3\\pi}{4}", "3pi/4"),
    ("\\frac{\\pi}{2}", "pi/2"),
    ("\\pi r^2", "pi*r^2"),
    ("2\\sqrt{2}", "2sqrt(2)"),
    ("2\\sqrt{2}", "sqrt(8)"),
    ("(n+1)!", "(n+1)!"),
    ("x^2+1", "x^2+1"),
    ("e^{x}", "e^x"),
    ("e^{-x^2}", "e^(-x^2)"),
    ("x^{-1}", "x^-1"),
    ("\\frac{1}{x}", "x^-1"),
    ("2^{10}", "2**10"),
    ("\\ln 2", "ln(2)"),
]

# (reference, wrong answer): near misses in plain notation against LaTeX or plain references.
NOT_EQUIVALENT = [
    ("2^(n-1)", "2^(n+1)"),
    ("2^{n-1}", "2^n-1"),
    ("\\sqrt{2}", "sqrt(3)"),
    ("sqrt(2)", "2"),
    ("\\frac{3\\pi}{4}", "pi/4"),
    ("\\frac{3\\pi}{4}", "3/4"),
    ("\\pi", "p i"),
    ("252", "C(10, 4)"),
    ("\\binom{n}{2}", "n choose 3"),
    ("\\frac{n(n-3)}{2}", "n(n+3)/2"),
    ("(n+1)^{n-1}", "(n+1)^(n-2)"),
    ("2^{(n-1)/2}", "2^((n+1)/2)"),
    ("\\sqrt{(a+c)(b+d)}", "sqrt(a+c)(b+d)"),
    ("2^floor(n/2)*floor(n/2)!", "2^ceil(n/2)*ceil(n/2)!"),
    ("1-1/2^(1/n)", "1-1/2^n"),
    ("sum_(i=1)^n i^2", "sum_(i=1)^n i^3"),
    ("x^{-1}", "x^-2"),
    ("e^x", "e^(-x)"),
    ("\\ln 2", "ln(3)"),
    ("\\frac{1}{2}", "1/3"),
]


def test_plain_notation_matches_latex_both_ways(math_reward):
    latex = [a for a, _ in EQUIVALENT]
    plain = [b for _, b in EQUIVALENT]
    # plain answer against a LaTeX reference, then a plain reference against a LaTeX answer
    assert not _failures(math_reward, [f"<answer>{p}</answer>" for p in plain], latex, 1.0)
    assert not _failures(math_reward, [f"\\boxed{{{t}}}" for t in latex], plain, 1.0)


def test_plain_notation_near_misses_score_zero(math_reward):
    refs = [r for r, _ in NOT_EQUIVALENT]
    wrong = [w for _, w in NOT_EQUIVALENT]
    assert not _failures(math_reward, [f"<answer>{w}</answer>" for w in wrong], refs, 0.0)
    # and the other way round: the near miss as the reference
    assert not _failures(math_reward, [f"<answer>{r}</answer>" for r in refs], wrong, 0.0)


def test_reference_is_still_compared_first(math_reward):
    # math-verify's verify(gold, pred) is asymmetric on purpose: an interval answers an inequality reference,
    # an inequality does not answer an interval reference
    (fwd,) = math_reward(["<answer>[0,1]</answer>"], ["0 \\le x \\le 1"])
    (rev,) = math_reward(["<answer>0 \\le x \\le 1</answer>"], ["[0,1]"])
    assert (fwd.score, rev.score) == (1.0, 0.0)


@pytest.mark.parametrize(
    "text,latex",
    [
        ("2^(n-1)", "2^{(n-1)}"),
        ("2^((n+1)/2)", "2^{((n+1)/2)}"),  # math-verify's own regex gives 2^{(n+1}/2)
        ("sqrt(n(n+1))", "\\sqrt{n(n+1)}"),
        ("2^sqrt(2)", "2^{\\sqrt{2}}"),
        ("x^-(n+1)", "x^{-(n+1)}"),
        ("x^ -1", "x^{-1}"),
        ("2^floor(n/2)*floor(n/2)!", "2^{\\lfloor(n/2)\\rfloor }*\\lfloor(n/2)\\rfloor !"),
        ("C(n+1, 2m+1)", "\\binom{n+1}{ 2m+1}"),
        ("C(1, 2, 3)", "C(1, 2, 3)"),  # not a binomial
        ("ln(2)+pi", "\\ln(2)+\\pi "),
        ("pin", "pin"),
        ("2**10", "2^10"),
        # LaTeX passes through, parentheses escaped with a backslash included
        ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
        ("\\sqrt{2}+\\binom{n}{2}", "\\sqrt{2}+\\binom{n}{2}"),
        ("\\left(1,2\\right)", "\\left(1,2\\right)"),
        ("\\(x^2\\)", "\\(x^2\\)"),
        # unbalanced input is left alone
        ("sqrt(2", "\\sqrt(2"),
        ("2^(n", "2^(n"),
        (")(", ")("),
    ],
)
def test_plain_to_latex(text, latex):
    assert plain_to_latex(text) == latex
