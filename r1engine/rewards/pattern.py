"""Pattern reward: 1.0 when a regular expression occurs in the response, else 0.0.

A rule that knows a property of the text (a closing phrase, a second-person address, a banned word) without a
model: the check beside a reward model that was trained to prefer that property, so that what the model rewards can
be compared with what a rule sees (a reward-hacking monitor), or a small shaping reward of its own. By default only
the final summary after the reasoning block is searched (`r1engine.rewards.parsing.final_summary`), which is what
a helpfulness reward model is shown; `whole_response=True` searches everything. References are ignored.

    rewards: {routes: {general: {"rm:helpful": 1.0, pattern: 0.0}},
              options: {pattern: {pattern: "\\byou(r|rs|rself)?\\b"}}}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .parsing import final_summary
from .registry import RewardResult, check_batch, register_reward

_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}


@register_reward("pattern")
class PatternReward:
    """Score 1.0 when `pattern` is found (`re.search`); `flags`: any of "i", "m", "s" (case-insensitive by default)."""

    def __init__(self, pattern: str = "", flags: str = "i", whole_response: bool = False) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("rewards.options.pattern.pattern: a non-empty regular expression is required")
        unknown = sorted(set(flags) - set(_FLAGS))
        if unknown:
            raise ValueError(f"rewards.options.pattern.flags: unknown flag {unknown[0]!r} (known: i, m, s)")
        try:
            self.regex = re.compile(pattern, sum((_FLAGS[f] for f in set(flags)), 0))
        except re.error as exc:
            raise ValueError(
                f"rewards.options.pattern.pattern: not a regular expression ({exc}): {pattern!r}"
            ) from None
        self.whole_response = bool(whole_response)

    def score_one(self, completion: str) -> RewardResult:
        text = completion if self.whole_response else final_summary(completion)
        return RewardResult(1.0) if self.regex.search(text) else RewardResult(0.0, "no match")

    def __call__(self, completions: Sequence[str], references: Sequence[Any] | None = None) -> list[RewardResult]:
        if references is None:
            references = [None] * len(completions)
        check_batch("pattern", completions, references)
        return [self.score_one(c) for c in completions]
