"""Code reward: pass / partial / fail, all-or-nothing, whitespace normalisation, extraction, time limit."""

from __future__ import annotations

import os

import pytest

from r1engine.rewards import get_reward
from r1engine.rewards.code import normalize_output
from r1engine.rewards.parsing import extract_code
from r1engine.rewards.sandbox import sandbox_strength

ADD_TESTS = {
    "tests": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "10 -4\n", "output": "6"},
        {"input": "7 7", "output": "  14  \n\n"},
        {"input": "0 0\n", "output": "0\n"},
    ]
}
SOLUTION = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
PARTIAL = "```python\na, b = map(int, input().split())\nprint(a + b if b >= 0 else a - b)\n```"  # fails test 1


def test_pass_partial_fail():
    code = get_reward("code", time_limit_s=2.0)
    res = code([SOLUTION, PARTIAL, "```python\nprint(3)\n```", "no code here"], [ADD_TESTS] * 4)
    assert res[0].score == 1.0 and res[0].reason is None
    assert res[1].score == pytest.approx(3 / 4) and "test 1: wrong answer" in res[1].reason
    assert res[2].score == pytest.approx(1 / 4)
    assert res[3].score == 0.0 and res[3].reason == "no code block"


def test_all_or_nothing_and_errors():
    code = get_reward("code", time_limit_s=2.0, all_or_nothing=True)
    res = code([SOLUTION, PARTIAL, "```python\nraise ValueError('nope')\n```"], [ADD_TESTS] * 3)
    assert [r.score for r in res] == [1.0, 0.0, 0.0]
    assert res[1].reason == "test 1: wrong answer"
    assert "ValueError: nope" in res[2].reason


def test_time_limit_per_test_and_reference_shapes():
    code = get_reward("code", time_limit_s=0.5)
    slow = "```python\nimport time\nn = int(input())\ntime.sleep(n)\nprint(n)\n```"
    ref = {"inputs": ["0", "5"], "outputs": ["0", "5"]}  # APPS / open-r1 shape
    (r,) = code([slow], [ref])
    assert r.score == 0.5 and "test 1: timeout" in r.reason
    (r,) = code([slow], [[{"input": "0", "output": "0"}]])
    assert r.score == 1.0
    with pytest.raises(ValueError, match="reference must be"):
        code([slow], [{"bogus": 1}])


def test_normalisation_and_extraction():
    assert normalize_output("\n 1 2 \n3\t\n\n") == ["1 2", "3"]
    assert normalize_output("1\n2") != normalize_output("1 2")  # line structure matters (unlike zip)
    text = "```python\nprint(1)\n```\nthen better:\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("<think>x</think><answer>print(5)</answer>") == "print(5)"
    assert extract_code("nothing") is None


def test_sandbox_strength_is_reported():
    assert sandbox_strength() in ("bubblewrap", "rlimit")


def test_forced_fallback_is_reported_in_a_fresh_process():
    import subprocess
    import sys

    code = "from r1engine.rewards.sandbox import sandbox_strength as s; print(s())"
    env = dict(os.environ, R1ENGINE_SANDBOX="rlimit")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "rlimit"
    assert "WEAKER" in out.stderr  # logged once, as a warning
