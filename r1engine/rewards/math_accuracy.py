"""Math accuracy reward: is the final answer equivalent to the reference?

Extraction (``parsing.extract_answer``): the last ``<answer>`` content (its ``\\boxed{}`` if any), else the last
``\\boxed{}``, else the line after GSM8K's ``####`` marker.
Equivalence is decided by math-verify (ANTLR LaTeX -> SymPy; numbers, fractions, decimals, percentages,
``\\frac``, ``\\sqrt``, ``\\pi``, sets, intervals...), never by hand-written LaTeX parsing, with the gold
answer first (``verify`` is asymmetric on purpose, against reward hacking). Plain ASCII notation, on either
side (``2^(n-1)``, ``sqrt(2)``, ``3*pi/4``, ``C(n, k)``), is first rewritten to LaTeX by
:func:`plain_to_latex`, a small parenthesis-matching pass, because the LaTeX grammar misreads it.

Safety: SymPy can stall in C code on answers like ``2**2**2**100`` or ``10^{10^{10^{10}}}``, so every
math-verify call runs in a :class:`~r1engine.rewards.isolated.KillableWorker` with a per-answer timeout
and a memory limit; a stalled or exploded check scores 0 with reason "timeout" / "killed: memory limit"
and the helper is replaced. Answers over ``max_answer_chars`` are rejected before any parsing. A fast
path decides pairs of plain integers/decimals/fractions exactly in-process (no round trip).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from .isolated import KillableWorker, WorkerCrashed, WorkerTimeout
from .parsing import extract_answer, parse_number
from .registry import RewardResult, check_batch, register_reward

_log = logging.getLogger(__name__)
_mv: Any = None


# Plain notation -> LaTeX. The ANTLR LaTeX grammar misreads plain math: "2^(n-1)" does not parse (an exponent
# needs braces), "sqrt(2)" is s*q*r*t(2), "pi" is p*i, "ln(2)" is l*n(2), "x^-1" and "2**3" fail, "n choose 2"
# is 2. math-verify's NormalizationConfig.malformed_operators (now on for both sides; it was off for the
# prediction) rewrites "^(...)" and "sqrt(...)" with non-greedy regexes that break on nested parentheses
# ("2^((n+1)/2)" -> "2^{(n+1}/2)"), so the pass below matches parentheses first. It skips every word after a
# backslash, so LaTeX commands pass through.
_FUNCS = frozenset("sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split())
_CALLS = _FUNCS | {"sqrt", "floor", "ceil", "C", "binom"}  # names rewritten when followed by "("
_WORD_RE = re.compile(r"[A-Za-z]+")
_NEG_EXP_RE = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]")
_CHOOSE_RE = re.compile(r"(?<![\\\w])(\w+)\s+choose\s+(\w+)(?!\w)")


def _parens(s: str) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Index of the matching ")" of each "(" and the top-level commas inside it; escaped "\\(" skipped."""
    match: dict[int, int] = {}
    commas: dict[int, list[int]] = {}
    stack: list[int] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            stack.append(i)
            commas[i] = []
        elif c == ")" and stack:
            match[stack.pop()] = i
        elif c == "," and stack:
            commas[stack[-1]].append(i)
        i += 1
    return match, commas


def plain_to_latex(s: str) -> str:
    """Rewrite plain ASCII math into the LaTeX that math-verify parses; LaTeX commands are left alone.

    ``2^(n-1)`` -> ``2^{(n-1)}``, ``x^-1`` -> ``x^{-1}``, ``2^sqrt(2)`` -> ``2^{\\sqrt{2}}``,
    ``sqrt(x)`` / ``√(x)`` -> ``\\sqrt{x}``, ``pi`` -> ``\\pi``, ``floor(x)`` -> ``\\lfloor(x)\\rfloor``,
    ``C(n, k)`` / ``binom(n, k)`` / ``n choose k`` -> ``\\binom{n}{k}``, ``sum_(i=1)^n`` -> ``\\sum_{i=1}^n``,
    ``ln(x)`` -> ``\\ln(x)`` (same for sin, cos, tan, log, exp, ...), ``**`` -> ``^``. Linear time;
    parentheses are matched, never guessed.
    """
    s = _CHOOSE_RE.sub(r"\\binom{\1}{\2}", s.replace("**", "^").replace("√", "sqrt"))
    n = len(s)
    match, commas = _parens(s)
    repl: dict[int, str] = {}  # index -> what replaces that character
    after: dict[int, str] = {}  # index -> text added after that character

    def skip_spaces(k: int) -> int:
        while k < n and s[k] == " ":
            k += 1
        return k

    def group_end(k: int) -> int | None:
        """The closing ")" of a "(...)" or a "name(...)" call (name in _CALLS) starting at k, else None."""
        if k < n and s[k] == "(":
            return match.get(k)
        m = _WORD_RE.match(s, k)
        if m is None or m.group() not in _CALLS:
            return None
        j = skip_spaces(m.end())
        return match.get(j) if j < n and s[j] == "(" else None

    out: list[str] = []
    i = 0
    while i < n:
        c = s[i]
        if c == "\\":  # a LaTeX command or escaped character: copied as is
            m = _WORD_RE.match(s, i + 1)
            j = m.end() if m else i + 2
            out.append(s[i:j])
            i = j
            continue
        if c == "^":  # brace a parenthesised, called or negative exponent
            k = skip_spaces(i + 1)
            neg = k < n and s[k] == "-"
            k += 1 if neg else 0
            end = group_end(k)
            if end is not None:
                out.append("^{-" if neg else "^{")
                after[end] = after.get(end, "") + "}"
                i = k
                continue
            m = _NEG_EXP_RE.match(s, k) if neg else None
            if m:
                out.append("^{-" + m.group() + "}")
                i = m.end()
                continue
        m = _WORD_RE.match(s, i)
        if m is None:
            out.append(repl.get(i, c) + after.get(i, ""))
            i += 1
            continue
        w = m.group()
        j = skip_spaces(m.end())
        end = match.get(j) if j < n and s[j] == "(" else None
        i = m.end()
        if w == "pi":
            out.append("\\pi ")
        elif w == "sqrt" and end is not None:
            out.append("\\sqrt{")
            repl[end] = "}"
            i = j + 1
        elif w == "sqrt":
            out.append("\\sqrt")
        elif w in ("floor", "ceil") and end is not None:
            out.append(f"\\l{w}(")
            repl[end] = f")\\r{w} "
            i = j + 1
        elif w in ("C", "binom") and end is not None and len(commas[j]) == 1:
            out.append("\\binom{")
            repl[commas[j][0]] = "}{"
            repl[end] = "}"
            i = j + 1
        elif w in ("sum", "prod") and s.startswith("_(", m.end()) and m.end() + 1 in match:
            out.append(f"\\{w}_{{")  # sum_(i=1)^n -> \sum_{i=1}^n
            repl[match[m.end() + 1]] = "}"
            i = m.end() + 2
        elif w in _FUNCS and end is not None:
            out.append("\\" + w)
        else:
            out.append(w)
    return "".join(out)


def _math_verify() -> Any:
    global _mv
    if _mv is None:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig

        math_verify.NormalizationConfig = NormalizationConfig
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _mv = math_verify
    return _mv


def parse_answer(text: str) -> list[Any]:
    """math-verify's parse of one answer (reference or prediction), IN THE CURRENT PROCESS: SymPy objects
    first, then the normalised string it fell back to; [] when nothing was found. Trusted input only (SymPy
    can stall on hostile answers: see the module docstring).

    Plain notation is rewritten to LaTeX first (:func:`plain_to_latex`), and a bare answer is boxed so that
    the whole string is the answer. The same LaTeX normalisation (math-verify's defaults, ``malformed_operators``
    and ``nits`` included: ``\\frac12``, ``\\sqrt2``) is used for both sides.
    """
    mv = _math_verify()
    latex = mv.LatexExtractionConfig(boxed_match_priority=0)
    text = plain_to_latex(text)
    if "\\boxed" in text or "$" in text or "\\(" in text or "\\[" in text:
        return mv.parse(text, extraction_config=[latex, mv.ExprExtractionConfig()], parsing_timeout=None)
    # LaTeX only: the expression extractor would pull a stray number out of an answer that does not parse
    # (the CHAMP reference "((-1)^(n+1)+n+1)/(n+2) (i.e., 1 if for odd n, ...)" would read as 1).
    return mv.parse("\\boxed{" + text + "}", extraction_config=[latex], parsing_timeout=None)


def verify_pair(gold: str, pred: str) -> tuple[float, str | None]:
    """Run math-verify on one (gold, prediction) pair, IN THE CURRENT PROCESS (the helper calls this).

    Returns (score, reason). Untrusted input must go through :class:`MathAccuracyReward` instead, which
    calls this in a killable helper with a timeout.
    """
    gold_p = parse_answer(gold)
    if not gold_p:
        return 0.0, "parse error: reference"
    pred_p = parse_answer(pred)
    if not pred_p:
        return 0.0, "parse error: answer"
    return (1.0, None) if _math_verify().verify(gold_p, pred_p, timeout_seconds=None) else (0.0, None)


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
