"""Arithmetic reward (the trainer's demo task): the ``<answer>`` must be a plain number equal to the reference.

Pure Python and exact (``fractions.Fraction``), no worker process: the parser accepts only bounded plain
numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``), so nothing can blow up.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from .parsing import extract_answer, parse_number
from .registry import RewardResult, check_batch, register_reward


def _reference_value(ref: Any) -> Fraction:
    if isinstance(ref, bool):
        raise TypeError("arithmetic: reference must be a number, got bool")
    if isinstance(ref, (int, Fraction)):
        return Fraction(ref)
    if isinstance(ref, float):
        return Fraction(ref).limit_denominator(10**9)
    if isinstance(ref, str):
        v = parse_number(ref)
        if v is not None:
            return v
    raise ValueError(f"arithmetic: reference must be an int, Fraction or numeric string, got {ref!r}")


@register_reward("arithmetic")
class ArithmeticReward:
    """1.0 when the extracted answer equals the reference exactly, else 0.0 with a reason."""

    def __init__(self, max_digits: int = 100):
        self.max_digits = int(max_digits)

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        check_batch("arithmetic", completions, references)
        out = []
        for text, ref in zip(completions, references, strict=True):
            target = _reference_value(ref)
            ans = extract_answer(text)
            if ans is None:
                out.append(RewardResult(0.0, "no <answer> tag"))
                continue
            value = parse_number(ans, self.max_digits)
            if value is None:
                out.append(RewardResult(0.0, f"parse error: not a plain number: {ans[:40]!r}"))
            else:
                out.append(RewardResult(1.0 if value == target else 0.0))
        return out
