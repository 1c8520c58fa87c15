"""`RewardFormat`: how a reward model is used, which travels with its checkpoints.

It says how a model's inputs are built from text and how its outputs are read (a pairwise preference model or a
pointwise classifier; one response or a rendered pair per input). A checkpoint keeps it in its `config.json` under
`r1engine_reward` (`FORMAT_KEY`), which transformers keeps as an unused attribute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FORMAT_KEY", "INPUTS", "KINDS", "TEMPLATES", "RewardFormat"]

KINDS = ("pairwise", "pointwise")
INPUTS = ("pair", "single")
TEMPLATES = ("auto", "chat", "plain")
FORMAT_KEY = "r1engine_reward"
"""The `config.json` field holding a checkpoint's `RewardFormat`."""


@dataclass(frozen=True)
class RewardFormat:
    """How a reward model is used.

    `kind`: "pairwise" (a preference model trained with the Bradley-Terry loss: one scalar, larger is preferred) or
    "pointwise" (a classifier: one logit of "safe", or two logits [unsafe, safe]).
    `input`: "pair" (the model reads a prompt and two responses rendered into one comparison and says how much it
    prefers the first; used with the A/B swap, see `r1engine.reward_models.scoring`) or "single" (one prompt and one
    response; a pair is then compared by the difference of the two scores). Pointwise models read single inputs.
    `template`: "chat" (the tokenizer's chat template), "plain" (text joined by blank lines) or "auto" (chat when
    the tokenizer has a chat template). `safe_label`: for a two-logit classifier, the index of "safe" (None: the
    label named "safe" in `id2label`, else 1).
    """

    kind: Literal["pairwise", "pointwise"] = "pairwise"
    input: Literal["pair", "single"] = "pair"
    template: Literal["auto", "chat", "plain"] = "auto"
    safe_label: int | None = None

    def __post_init__(self) -> None:
        for name, choices in (("kind", KINDS), ("input", INPUTS), ("template", TEMPLATES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.kind == "pointwise" and self.input != "single":
            raise ValueError("input: a pointwise classifier reads single responses (input='single'), got 'pair'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], key: str = FORMAT_KEY) -> RewardFormat:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: unknown field (known: kind, input, template, safe_label)")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{key}.{exc}") from None

    def check_labels(self, num_labels: int) -> None:
        """Raise when a head of `num_labels` outputs cannot be read this way."""
        if self.kind == "pairwise" and num_labels != 1:
            raise ValueError(f"num_labels: a pairwise (Bradley-Terry) reward model has one output, got {num_labels}")
        if self.kind == "pointwise" and num_labels not in (1, 2):
            raise ValueError(
                f"num_labels: a pointwise classifier has one logit (safe) or two (unsafe, safe), got {num_labels}"
            )
