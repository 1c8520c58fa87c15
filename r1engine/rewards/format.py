"""Format reward: the R1 template ``<think> reasoning </think> <answer> answer </answer>``, nothing after.

Strict check (score 1.0): exactly one ``<think>``/``</think>`` pair followed by exactly one
``<answer>``/``</answer>`` pair, only whitespace before, between and after, no nested or repeated tags,
non-empty answer (and non-empty thought unless ``allow_empty_think``). With ``partial=True`` a failing
completion earns 0.25 for each of the four tags that appears exactly once (the open-r1 "tag count" idea),
so a model gets a gradient towards the template before it produces it whole.

``think_in_prompt=True`` is for chat templates whose prompt already ends with ``<think>``: the completion
then starts inside the thought and must NOT repeat ``<think>`` (a repeated tag fails the strict check).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .registry import RewardResult, check_batch, register_reward

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_STRICT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def _diagnose(text: str, counts: dict[str, int]) -> str:
    for tag in _TAGS:
        if counts[tag] == 0:
            return f"missing {tag}"
    for tag in _TAGS:
        if counts[tag] > 1:
            return f"repeated {tag}"
    pos = [text.find(t) for t in _TAGS]
    if pos != sorted(pos):
        return "tags out of order"
    if text[: pos[0]].strip():
        return "text before <think>"
    if text[pos[1] + len("</think>") : pos[2]].strip():
        return "text between </think> and <answer>"
    if text[pos[3] + len("</answer>") :].strip():
        return "text after </answer>"
    return "malformed template"


@register_reward("format")
class FormatReward:
    """Score the R1 template; see the module docstring. References are ignored."""

    def __init__(self, partial: bool = False, think_in_prompt: bool = False, allow_empty_think: bool = False):
        self.partial = bool(partial)
        self.think_in_prompt = bool(think_in_prompt)
        self.allow_empty_think = bool(allow_empty_think)

    def score_one(self, completion: str) -> RewardResult:
        """Score one completion."""
        text = "<think>" + completion if self.think_in_prompt else completion
        counts = {t: text.count(t) for t in _TAGS}
        m = _STRICT_RE.fullmatch(text) if all(c == 1 for c in counts.values()) else None
        if m is not None:
            think, answer = m.group(1), m.group(2)
            if not answer.strip():
                reason = "empty <answer>"
            elif not think.strip() and not self.allow_empty_think:
                reason = "empty <think>"
            else:
                return RewardResult(1.0)
        else:
            reason = _diagnose(text, counts)
        if self.partial:
            return RewardResult(0.25 * sum(1 for c in counts.values() if c == 1), reason)
        return RewardResult(0.0, reason)

    def __call__(self, completions: Sequence[str], references: Sequence[Any] | None = None) -> list[RewardResult]:
        if references is None:
            references = [None] * len(completions)
        check_batch("format", completions, references)
        return [self.score_one(c) for c in completions]
