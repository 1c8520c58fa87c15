"""Countdown reward: combine the given numbers with + - * / (and parentheses) to reach the target.

The expression is parsed with :mod:`ast` and evaluated by an allow-list walker in exact ``Fraction``
arithmetic: only integer literals, the binary operators + - * / (``**`` only with ``allow_pow``, with
bounded base and exponent), unary minus/plus and parentheses. Names, calls, attributes, floats, strings,
comparisons... are rejected, so ``eval`` is never needed and hostile input such as ``9**9**9**9`` or
``().__class__`` cannot run or stall. Each given number may be used at most once (exactly once with
``use_all=True``), as a multiset. Reference: ``{"numbers": [...], "target": int}`` or ``(numbers, target)``.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from .parsing import extract_answer
from .registry import RewardResult, check_batch, register_reward

_MAX_EXPR_CHARS = 400
_MAX_POW_EXPONENT = 16
_MAX_VALUE_BITS = 4096


class ExpressionError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is the reward's reason."""


def _walk(node: ast.AST, literals: list[int], allow_pow: bool) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, literals, allow_pow)
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise ExpressionError(f"only integer literals allowed, got {node.value!r}")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _walk(node.operand, literals, allow_pow)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a = _walk(node.left, literals, allow_pow)
        b = _walk(node.right, literals, allow_pow)
        op = node.op
        if isinstance(op, ast.Add):
            r = a + b
        elif isinstance(op, ast.Sub):
            r = a - b
        elif isinstance(op, ast.Mult):
            r = a * b
        elif isinstance(op, ast.Div):
            if b == 0:
                raise ExpressionError("division by zero")
            r = a / b
        elif isinstance(op, ast.Pow) and allow_pow:
            if b.denominator != 1 or abs(b) > _MAX_POW_EXPONENT:
                raise ExpressionError(f"exponent guard: exponent must be an integer with |e| <= {_MAX_POW_EXPONENT}")
            if a == 0 and b < 0:
                raise ExpressionError("division by zero")
            if max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(int(b)) > _MAX_VALUE_BITS:
                raise ExpressionError("exponent guard: result too large")
            r = a ** int(b)
        else:
            raise ExpressionError(f"operator {type(op).__name__} not allowed")
        if max(r.numerator.bit_length(), r.denominator.bit_length()) > _MAX_VALUE_BITS:
            raise ExpressionError("value too large")
        return r
    raise ExpressionError(f"{type(node).__name__} not allowed")


def evaluate_expression(expr: str, allow_pow: bool = False) -> tuple[Fraction, list[int]]:
    """Evaluate an arithmetic expression exactly; return (value, integer literals used). Raises ExpressionError."""
    expr = expr.replace("\\times", "*").replace("\\cdot", "*").replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(expr) > _MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    if not allow_pow and "**" in expr:
        raise ExpressionError("operator Pow not allowed")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"parse error: {type(e).__name__}") from None
    literals: list[int] = []
    try:
        value = _walk(tree, literals, allow_pow)
    except RecursionError:
        raise ExpressionError("expression nested too deeply") from None
    return value, literals


def _reference(ref: Any) -> tuple[list[int], Fraction]:
    if isinstance(ref, dict):
        nums, target = ref.get("numbers", ref.get("nums")), ref.get("target")
    elif isinstance(ref, (tuple, list)) and len(ref) == 2:
        nums, target = ref
    else:
        raise ValueError(
            f"countdown: reference must be {{'numbers': [...], 'target': int}} or (numbers, target), got {ref!r}"
        )
    if nums is None or target is None:
        raise ValueError(f"countdown: reference needs 'numbers' and 'target', got {ref!r}")
    return [int(n) for n in nums], Fraction(target)


@register_reward("countdown")
class CountdownReward:
    """1.0 when the answer expression reaches the target using the given numbers (at most / exactly once)."""

    def __init__(self, use_all: bool = False, allow_pow: bool = False):
        self.use_all = bool(use_all)
        self.allow_pow = bool(allow_pow)

    def score_one(self, completion: str, ref: Any) -> RewardResult:
        """Score one completion against ``ref``."""
        nums, target = _reference(ref)
        ans = extract_answer(completion)
        if ans is None:
            return RewardResult(0.0, "no <answer> tag")
        expr = ans.split("=")[0] if "=" in ans and len(ans) <= _MAX_EXPR_CHARS else ans
        try:
            value, used = evaluate_expression(expr, self.allow_pow)
        except ExpressionError as e:
            return RewardResult(0.0, str(e))
        have, want = Counter(nums), Counter(used)
        if want - have:
            return RewardResult(0.0, f"uses numbers not given (or more than once): {sorted((want - have).elements())}")
        if self.use_all and want != have:
            return RewardResult(0.0, f"does not use every number: missing {sorted((have - want).elements())}")
        return RewardResult(1.0 if value == target else 0.0, None if value == target else f"evaluates to {value}")

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        check_batch("countdown", completions, references)
        return [self.score_one(c, r) for c, r in zip(completions, references, strict=True)]
