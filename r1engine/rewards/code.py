"""Code reward: run the completion's Python program against its test cases in the sandbox.

Input/output tests (APPS, open-r1). The program is the last fenced ```python block of the completion (else
the ``<answer>`` content). Each test runs in its own sandboxed process
(:func:`r1engine.rewards.sandbox.run_python`) with a per-test wall-time limit; the program's stdout is
compared with the expected output after whitespace normalisation (leading/trailing blank lines dropped,
each line stripped; the number of lines must match, unlike open-r1's ``zip`` comparison). Reward: fraction
of tests passed, or 1/0 with ``all_or_nothing``. Evaluation stops at the first failure when
``all_or_nothing`` (nothing to gain from the rest).

Reference: ``{"tests": [{"input": str, "output": str}, ...]}``, or a list of such dicts, or
``{"inputs": [...], "outputs": [...]}`` (the APPS / open-r1 ``verification_info`` shape).

Assert tests (HumanEval, MBPP): ``{"test": str, "entry_point": str, "prompt": str (optional)}`` (``test``
defines ``check(candidate)``) or ``{"test_list": [str, ...], "test_setup_code": str (optional),
"test_imports": [str, ...] (optional)}`` (``{"tests": [str, ...]}`` too). Without a code block the whole
completion is the code (HumanEval bodies come unfenced). With a ``prompt``, a program that does not define
the entry point is ``prompt + code`` (a body); one that does gets the prompt's imports prepended. All tests
run in one sandboxed process (:mod:`r1engine.rewards.assert_harness`, which the program cannot fool by
printing, exiting or patching; see its threat model), with ``time_limit_s`` per test (and for the program's
top-level code); the reward is 1 when every test passes, else 0 with the failing assert, the exception, or
the limit hit.

The sandbox must contain the programs: without bubblewrap the reward refuses to start
(:class:`~r1engine.rewards.sandbox.SandboxUnavailable`, saying why) unless ``allow_weak_sandbox`` accepts the
weaker rlimit mode.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from .assert_harness import run_assert_tests
from .parsing import extract_code
from .registry import RewardResult, check_batch, register_reward
from .sandbox import SandboxLimits, require_sandbox, run_python, sandbox_strength


def normalize_output(text: str) -> list[str]:
    """Lines with surrounding whitespace stripped, leading/trailing blank lines removed."""
    return [line.strip() for line in text.strip().splitlines()]


def _tests(ref: Any) -> list[tuple[str, str]]:
    if isinstance(ref, dict) and "tests" in ref:
        ref = ref["tests"]
    if isinstance(ref, dict) and "inputs" in ref and "outputs" in ref:
        if len(ref["inputs"]) != len(ref["outputs"]):
            raise ValueError("code: reference 'inputs' and 'outputs' must have the same length")
        return [(str(i), str(o)) for i, o in zip(ref["inputs"], ref["outputs"], strict=True)]
    if isinstance(ref, (list, tuple)) and all(isinstance(t, dict) and "input" in t and "output" in t for t in ref):
        return [(str(t["input"]), str(t["output"])) for t in ref]
    raise ValueError(
        "code: reference must be {'tests': [{'input': str, 'output': str}, ...]}, {'inputs': [...], "
        "'outputs': [...]}, {'test': str, 'entry_point': str, 'prompt': str} (HumanEval) or "
        "{'test_list': [str, ...], 'test_setup_code': str, 'test_imports': [str, ...]} (MBPP), "
        f"got {str(ref)[:120]!r}"
    )


@dataclasses.dataclass(frozen=True)
class AssertTests:
    """An assert-style reference: test sources run in order after trusted ``setup`` code."""

    tests: list[str]
    setup: str = ""
    entry_point: str | None = None
    prompt: str | None = None


def _opt_str(ref: dict, key: str) -> str:
    val = ref.get(key)
    if val is None:
        return ""
    if not isinstance(val, str):
        raise ValueError(f"code: reference {key!r} must be a str, got {str(val)[:120]!r}")
    return val


def _str_list(ref: dict, key: str) -> list[str]:
    val = ref.get(key)
    if val is None:
        return []
    if isinstance(val, str) or not isinstance(val, (list, tuple)) or not all(isinstance(t, str) for t in val):
        raise ValueError(f"code: reference {key!r} must be a list of str, got {str(val)[:120]!r}")
    return list(val)


def assert_tests(ref: Any) -> AssertTests | None:
    """The assert-style tests of ``ref`` (HumanEval or MBPP shape), or None for an input/output reference."""
    if not isinstance(ref, dict):
        return None
    if "test" in ref and "entry_point" in ref:
        test, entry, prompt = _opt_str(ref, "test"), ref["entry_point"], _opt_str(ref, "prompt")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"code: reference 'entry_point' must be a Python identifier, got {entry!r}")
        if not test.strip():
            raise ValueError(f"code: reference 'test' must define check(candidate), got {test[:120]!r}")
        # The prompt runs again on the tests' side, so helpers the tests call (HumanEval/32's poly) are the
        # prompt's, not the program's.
        return AssertTests([f"{test}\n\ncheck({entry})\n"], prompt, entry, prompt or None)
    key = "test_list" if "test_list" in ref else "tests"
    if key == "tests" and not (
        isinstance(ref.get("tests"), (list, tuple)) and ref["tests"] and all(isinstance(t, str) for t in ref["tests"])
    ):
        return None  # input/output tests (or a mix, which _tests rejects)
    tests = _str_list(ref, key)
    setup = "\n".join([*_str_list(ref, "test_imports"), _opt_str(ref, "test_setup_code")])
    return AssertTests(tests, setup.strip("\n") + "\n" if setup.strip() else "")


def defines(code: str, name: str) -> bool:
    """True when ``code`` defines ``name`` at top level (def, class or assignment at column 0).

    A regular expression, not ``ast``: the code is untrusted and this runs outside the sandbox."""
    n = re.escape(name)
    return re.search(rf"^(?:(?:async\s+)?def\s+{n}\s*\(|class\s+{n}\b|{n}\s*(?:=(?!=)|:))", code, re.M) is not None


def _prompt_imports(prompt: str) -> str:
    try:
        tree = ast.parse(prompt)  # the prompt is trusted (data set text)
    except (SyntaxError, ValueError):
        return ""
    return "".join(ast.unparse(n) + "\n" for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def assert_program(code: str, spec: AssertTests) -> str:
    """The program to test: ``code``, or ``prompt + code`` when the code is the entry point's body."""
    if not spec.prompt or spec.entry_point is None:
        return code
    if defines(code, spec.entry_point):
        return _prompt_imports(spec.prompt) + code
    return (spec.prompt if spec.prompt.endswith("\n") else spec.prompt + "\n") + code


@register_reward("code")
class CodeReward:
    """Fraction of test cases passed; 1/0 for assert tests (see the module docstring).

    Args:
        time_limit_s: wall-clock limit per test (assert tests: per assert or ``check``, summed into the limit
            of their one process).
        memory_bytes: address-space limit per test (assert tests: per process).
        all_or_nothing: 1.0 only when every test passes (always so for assert tests).
        max_tests: run at most this many tests per sample (the first ones).
        max_output_bytes: stdout+stderr cap per test (the program is killed past it).
        sandbox: force "bubblewrap" or "rlimit" (default: the strongest that works, ``sandbox_strength()``).
        allow_weak_sandbox: accept the weaker "rlimit" sandbox (forced, or the only one that works here); without
            it the reward refuses to be built there (:class:`~r1engine.rewards.sandbox.SandboxUnavailable`).
    """

    def __init__(
        self,
        time_limit_s: float = 2.0,
        memory_bytes: int = 512 << 20,
        all_or_nothing: bool = False,
        max_tests: int | None = None,
        max_output_bytes: int = 1 << 20,
        sandbox: str | None = None,
        allow_weak_sandbox: bool = False,
    ):
        self.limits = SandboxLimits(
            wall_time_s=float(time_limit_s), memory_bytes=int(memory_bytes), max_output_bytes=int(max_output_bytes)
        )
        self.all_or_nothing = bool(all_or_nothing)
        self.max_tests = max_tests
        if sandbox not in (None, "bubblewrap", "rlimit"):
            raise ValueError(f"code: sandbox must be None, 'bubblewrap' or 'rlimit', got {sandbox!r}")
        self.allow_weak_sandbox = bool(allow_weak_sandbox)
        self.sandbox = require_sandbox(sandbox, allow_weak=self.allow_weak_sandbox, who="code")
        self.sandbox_strength = sandbox or sandbox_strength()  # reported in the reward metrics

    def score_one(self, completion: str, ref: Any) -> RewardResult:
        """Run one completion's program on its tests."""
        spec = assert_tests(ref)
        if spec is not None:
            return self._score_asserts(completion, spec)
        tests = _tests(ref)
        if self.max_tests is not None:
            tests = tests[: self.max_tests]
        if not tests:
            return RewardResult(0.0, "no test cases")
        code = extract_code(completion)
        if code is None or not code.strip():
            return RewardResult(0.0, "no code block")
        passed = 0
        first_failure: str | None = None
        for k, (inp, expected) in enumerate(tests):
            res = run_python(code, inp, self.limits, self.sandbox, allow_weak=self.allow_weak_sandbox)
            if res.status == "sandbox error":  # the sandbox itself failed: no test of this program can run
                return RewardResult(0.0, res.reason)
            if res.status == "ok" and normalize_output(res.stdout) == normalize_output(expected):
                passed += 1
                continue
            if first_failure is None:
                why = "wrong answer" if res.status == "ok" else (res.reason or res.status)
                first_failure = f"test {k}: {why}"
            if self.all_or_nothing:
                break
        if passed == len(tests):
            return RewardResult(1.0)
        if self.all_or_nothing:
            return RewardResult(0.0, first_failure)
        return RewardResult(passed / len(tests), f"{passed}/{len(tests)} passed; first failure {first_failure}")

    def _score_asserts(self, completion: str, spec: AssertTests) -> RewardResult:
        tests = spec.tests if self.max_tests is None else spec.tests[: self.max_tests]
        if not tests:
            return RewardResult(0.0, "no test cases")
        code = extract_code(completion)
        if code is None:
            code = completion  # HumanEval bodies come unfenced
        if not code.strip():
            return RewardResult(0.0, "no code")
        limits = dataclasses.replace(self.limits, wall_time_s=self.limits.wall_time_s * (len(tests) + 1))
        out = run_assert_tests(
            assert_program(code, spec), tests, spec.setup, spec.entry_point, limits, self.sandbox,
            time_limit_s=self.limits.wall_time_s, allow_weak=self.allow_weak_sandbox,
        )  # fmt: skip
        return RewardResult(1.0) if out.passed else RewardResult(0.0, out.reason)

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        check_batch("code", completions, references)
        return [self.score_one(c, r) for c, r in zip(completions, references, strict=True)]
