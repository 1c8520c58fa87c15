"""Math accuracy reward: is the final answer equivalent to the reference?

Extraction: the last ``<answer>`` content (its ``\\boxed{}`` if any), else the last ``\\boxed{}``.
Equivalence is decided by math-verify (ANTLR LaTeX -> SymPy; numbers, fractions, decimals, percentages,
``\\frac``, ``\\sqrt``, ``\\pi``, sets, intervals...), never by hand-written LaTeX parsing, with the gold
answer first (``verify`` is asymmetric on purpose, against reward hacking).

Safety: SymPy can stall in C code on answers like ``2**2**2**100`` or ``10^{10^{10^{10}}}``, so every
math-verify call runs in a :class:`~r1engine.rewards.isolated.KillableWorker` with a per-answer timeout
and a memory limit; a stalled or exploded check scores 0 with reason "timeout" / "killed: memory limit"
and the helper is replaced. Answers over ``max_answer_chars`` are rejected before any parsing. A fast
path decides pairs of plain integers/decimals/fractions exactly in-process (no round trip).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .isolated import KillableWorker, WorkerCrashed, WorkerTimeout
from .parsing import extract_answer, parse_number
from .registry import RewardResult, check_batch, register_reward

_log = logging.getLogger(__name__)
_mv: Any = None


def _wrap(s: str) -> str:
    return s if ("\\boxed" in s or "$" in s or "\\(" in s or "\\[" in s) else "\\boxed{" + s + "}"


def verify_pair(gold: str, pred: str) -> tuple[float, str | None]:
    """Run math-verify on one (gold, prediction) pair, IN THE CURRENT PROCESS (the helper calls this).

    Returns (score, reason). Untrusted input must go through :class:`MathAccuracyReward` instead, which
    calls this in a killable helper with a timeout.
    """
    global _mv
    if _mv is None:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig

        math_verify.NormalizationConfig = NormalizationConfig
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _mv = math_verify
    mv = _mv
    latex_gold = mv.LatexExtractionConfig(boxed_match_priority=0)
    latex_pred = mv.LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=mv.NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all", equations=False
        ),
    )
    expr = mv.ExprExtractionConfig()
    gold_p = mv.parse(_wrap(gold), extraction_config=[latex_gold, expr], parsing_timeout=None)
    if not gold_p:
        gold_p = mv.parse(gold, extraction_config=[latex_gold, expr], parsing_timeout=None)
    if not gold_p:
        return 0.0, "parse error: reference"
    pred_p = mv.parse(_wrap(pred), extraction_config=[latex_pred, expr], parsing_timeout=None)
    if not pred_p:
        pred_p = mv.parse(pred, extraction_config=[latex_pred, expr], parsing_timeout=None)
    if not pred_p:
        return 0.0, "parse error: answer"
    return (1.0, None) if mv.verify(gold_p, pred_p, timeout_seconds=None) else (0.0, None)


@register_reward("math_accuracy")
class MathAccuracyReward:
    """1.0 when the extracted answer is equivalent to the reference (see the module docstring).

    Args:
        timeout_s: per-answer limit for the math-verify check (the helper is killed past it).
        max_answer_chars: longer extracted answers score 0 ("answer too long") without parsing.
        memory_limit_bytes: address-space limit of the helper process.
        fast_path: decide plain-number pairs in-process.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        max_answer_chars: int = 1000,
        memory_limit_bytes: int = 3 << 30,
        fast_path: bool = True,
    ):
        if timeout_s <= 0:
            raise ValueError(f"math_accuracy: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.fast_path = bool(fast_path)
        self._worker = KillableWorker(
            "r1engine.rewards.math_accuracy:verify_pair", memory_limit_bytes=memory_limit_bytes
        )

    def _fast(self, ref: str, ans: str) -> RewardResult | None:
        a, b = parse_number(ref, 40), parse_number(ans, 40)
        if a is None or b is None:
            return None
        if a == b:
            return RewardResult(1.0)
        # Unequal plain numbers: integers are decided here; decimals go to math-verify's rounding rules.
        if a.denominator == 1 and b.denominator == 1 and "." not in ans and "." not in ref:
            return RewardResult(0.0)
        return None

    def score_one(self, completion: str, reference: Any) -> RewardResult:
        """Score one completion."""
        if reference is None:
            return RewardResult(0.0, "no reference")
        ref = str(reference).strip()
        ans = extract_answer(completion)
        if ans is None:
            return RewardResult(0.0, "no <answer> tag or \\boxed{}")
        if not ans:
            return RewardResult(0.0, "empty answer")
        if len(ans) > self.max_answer_chars:
            return RewardResult(0.0, f"answer too long ({len(ans)} > {self.max_answer_chars} chars)")
        if self.fast_path:
            fast = self._fast(ref, ans)
            if fast is not None:
                return fast
        try:
            score, reason = self._worker.call(ref, ans, timeout=self.timeout_s)
        except WorkerTimeout:
            _log.warning("math_accuracy: verification timed out after %.1fs on %r", self.timeout_s, ans[:80])
            return RewardResult(0.0, "timeout")
        except (MemoryError, WorkerCrashed):
            return RewardResult(0.0, "killed: memory limit")
        except RuntimeError as e:
            return RewardResult(0.0, f"error: {e}")
        return RewardResult(float(score), reason)

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        check_batch("math_accuracy", completions, references)
        return [self.score_one(c, r) for c, r in zip(completions, references, strict=True)]

    def close(self) -> None:
        """Stop the helper process."""
        self._worker.kill()
