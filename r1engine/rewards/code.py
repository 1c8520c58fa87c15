"""Code reward: run the completion's Python program against input/output test cases in the sandbox.

The program is the last fenced ```python block of the completion (else the ``<answer>`` content). Each
test runs in its own sandboxed process (:func:`r1engine.rewards.sandbox.run_python`) with a per-test
wall-time limit; the program's stdout is compared with the expected output after whitespace
normalisation (leading/trailing blank lines dropped, each line stripped; the number of lines must match,
unlike open-r1's ``zip`` comparison). Reward: fraction of tests passed, or 1/0 with ``all_or_nothing``.
Evaluation stops at the first failure when ``all_or_nothing`` (nothing to gain from the rest).

Reference: ``{"tests": [{"input": str, "output": str}, ...]}``, or a list of such dicts, or
``{"inputs": [...], "outputs": [...]}`` (the APPS / open-r1 ``verification_info`` shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .parsing import extract_code
from .registry import RewardResult, check_batch, register_reward
from .sandbox import SandboxLimits, run_python


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
        "code: reference must be {'tests': [{'input': str, 'output': str}, ...]} or {'inputs': [...], "
        f"'outputs': [...]}}, got {str(ref)[:120]!r}"
    )


@register_reward("code")
class CodeReward:
    """Fraction of test cases passed (see the module docstring).

    Args:
        time_limit_s: wall-clock limit per test.
        memory_bytes: address-space limit per test.
        all_or_nothing: 1.0 only when every test passes.
        max_tests: run at most this many tests per sample (the first ones).
        max_output_bytes: stdout+stderr cap per test (the program is killed past it).
        sandbox: force "bubblewrap" or "rlimit" (default: the strongest that works, ``sandbox_strength()``).
    """

    def __init__(
        self,
        time_limit_s: float = 2.0,
        memory_bytes: int = 512 << 20,
        all_or_nothing: bool = False,
        max_tests: int | None = None,
        max_output_bytes: int = 1 << 20,
        sandbox: str | None = None,
    ):
        self.limits = SandboxLimits(
            wall_time_s=float(time_limit_s), memory_bytes=int(memory_bytes), max_output_bytes=int(max_output_bytes)
        )
        self.all_or_nothing = bool(all_or_nothing)
        self.max_tests = max_tests
        if sandbox not in (None, "bubblewrap", "rlimit"):
            raise ValueError(f"code: sandbox must be None, 'bubblewrap' or 'rlimit', got {sandbox!r}")
        self.sandbox = sandbox

    def score_one(self, completion: str, ref: Any) -> RewardResult:
        """Run one completion's program on its tests."""
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
            res = run_python(code, inp, self.limits, self.sandbox)
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

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        check_batch("code", completions, references)
        return [self.score_one(c, r) for c, r in zip(completions, references, strict=True)]
