"""Pulling the parts of an R1-style completion apart: ``<think>``, ``<answer>``, ``\\boxed{}``, code blocks, numbers.

All helpers are linear-time scans or non-backtracking regexes, safe on hostile megabyte inputs.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A plain number: integer, decimal, or a/b, with optional sign and thousands separators.
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_FRACTION_RE = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_LATEX_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the LAST ``<tag>...</tag>`` pair in ``text`` (None if absent).

    Two ``str.rfind`` scans, linear time: a regex such as ``<answer>(.*?)</answer>`` is quadratic on a
    completion made of thousands of unclosed ``<answer>`` tags (minutes for 160 kB)."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    opening = f"<{tag}>"
    start = text.rfind(opening, 0, close)
    if start < 0:
        return None
    return text[start + len(opening) : close]


def final_summary(response: str) -> str:
    """The text after the reasoning block: after the last ``</think>`` (stripped); "" for a response that opens
    ``<think>`` and never closes it (cut off mid-reasoning); all of it (stripped) for a response with neither tag.
    What a helpfulness reward model is shown (`r1engine.reward_models.text`)."""
    if not isinstance(response, str):
        raise TypeError(f"response: expected a str, got {type(response).__name__}")
    end = response.rfind("</think>")
    if end >= 0:
        return response[end + len("</think>") :].strip()
    if "<think>" in response:
        return ""
    return response.strip()


def extract_think(text: str, think_in_prompt: bool = False) -> str | None:
    """The chain of thought: the ``<think>...</think>`` content, or (prompt ending in ``<think>``) the text up to
    ``</think>``; None if absent."""
    if think_in_prompt and "<think>" not in text:
        end = text.find("</think>")
        return text[:end] if end >= 0 else None
    return extract_tag(text, "think")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; None if absent/unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5" (no braces): take the following token.
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


GSM8K_MARKER = "####"


def extract_answer(text: str) -> str | None:
    """The final answer: the last ``<answer>`` content (its last ``\\boxed{}`` if it has one), else the last
    ``\\boxed{}`` anywhere, else the rest of the line after the last GSM8K marker ``#### `` (what models tuned on
    GSM8K write); stripped. None when there is none of these."""
    ans = extract_tag(text, "answer")
    if ans is not None:
        boxed = extract_last_boxed(ans)
        return (boxed if boxed is not None else ans).strip()
    boxed = extract_last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = text.rfind(GSM8K_MARKER)
    if marker < 0:
        return None
    line = text[marker + len(GSM8K_MARKER) :].split("\n", 1)[0].strip()
    return line or None


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each complete fenced block, in order; linear scan over the ``` markers."""
    out = []
    pos = 0
    while True:
        start = text.find("```", pos)
        if start < 0:
            return out
        nl = text.find("\n", start + 3)
        if nl < 0:
            return out
        end = text.find("```", nl + 1)
        if end < 0:
            return out
        out.append((text[start + 3 : nl].strip(), text[nl + 1 : end]))
        pos = end + 3


def extract_code(text: str, languages: tuple[str, ...] = ("python", "py", "python3", "")) -> str | None:
    """The last fenced code block whose language tag is in ``languages`` ("" = untagged); else the
    ``<answer>`` content if it has no fence; else None."""
    last = None
    for lang, body in _fenced_blocks(text):
        if lang.lower() in languages:
            last = body
    if last is not None:
        return last
    ans = extract_tag(text, "answer")
    if ans is not None and "```" not in ans and ans.strip():
        return ans.strip("\n")
    return None


def parse_number(text: str, max_digits: int = 100) -> Fraction | None:
    """Exact value of a plain number: ``42``, ``-3.5``, ``1,234``, ``7/8``, ``\\frac{7}{8}``, ``$12$``, ``50%`` is
    NOT accepted (ambiguous). None when ``text`` is anything else or has more than ``max_digits`` digits."""
    s = text.strip().strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    if not s or len(s) > max_digits + 16:
        return None
    s = s.replace("\\!", "").replace("{,}", ",")
    m = _LATEX_FRAC_RE.fullmatch(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        return (-1 if m.group(1) else 1) * Fraction(num, den)
    m = _FRACTION_RE.fullmatch(s)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den else None
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s.replace(",", ""))
    return None
