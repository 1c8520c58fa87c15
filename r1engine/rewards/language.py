"""Language-consistency reward (DeepSeek-R1): the fraction of the chain-of-thought's words in the target language.

``Reward_language = Num(Words_target) / Num(Words)`` over the ``<think>`` part. Words are found by script,
with no downloaded model: a run of Latin letters is one word ("en" — any Latin-script language counts,
the paper's concern is English vs Chinese mixing); each CJK ideograph is one word ("zh", Chinese is not
space-delimited, so counting characters is the usual proxy); runs of any other letters (Cyrillic, Greek,
Arabic, kana, Hangul, ...) are words of no supported target. Digits, LaTeX commands and punctuation are
not words. The target comes from the reference when it is a language code ("en"/"zh"), else the option.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .parsing import extract_think
from .registry import RewardResult, check_batch, register_reward

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(rf"(?P<zh>[{_CJK}])|(?P<en>[{_LATIN}]+)|(?P<other>[^\W\d_{_CJK}{_LATIN}]+)")
LANGUAGES = ("en", "zh")


def count_words(text: str) -> dict[str, int]:
    """Word counts by script: {"en": ..., "zh": ..., "other": ...}."""
    counts = {"en": 0, "zh": 0, "other": 0}
    for m in _WORD.finditer(_LATEX_CMD.sub(" ", text)):
        counts[m.lastgroup] += 1
    return counts


@register_reward("language_consistency")
class LanguageConsistencyReward:
    """Fraction of CoT words in ``language`` ("en" or "zh")."""

    def __init__(self, language: str = "en", think_in_prompt: bool = False, use_whole_completion: bool = False):
        if language not in LANGUAGES:
            raise ValueError(f"language_consistency: language must be one of {LANGUAGES}, got {language!r}")
        self.language = language
        self.think_in_prompt = bool(think_in_prompt)
        self.use_whole_completion = bool(use_whole_completion)

    def __call__(self, completions: Sequence[str], references: Sequence[Any] | None = None) -> list[RewardResult]:
        if references is None:
            references = [None] * len(completions)
        check_batch("language_consistency", completions, references)
        out = []
        for text, ref in zip(completions, references, strict=True):
            lang = ref if isinstance(ref, str) and ref in LANGUAGES else self.language
            cot = text if self.use_whole_completion else extract_think(text, self.think_in_prompt)
            if cot is None:
                out.append(RewardResult(0.0, "no <think> section"))
                continue
            counts = count_words(cot)
            total = sum(counts.values())
            if total == 0:
                out.append(RewardResult(0.0, "no words in <think>"))
                continue
            frac = counts[lang] / total
            out.append(RewardResult(frac, None if frac in (0.0, 1.0) else f"{counts[lang]}/{total} words in {lang}"))
        return out
