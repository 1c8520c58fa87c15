"""Synthetic preference and safety data with a hidden rule that length cannot explain, for tests and demonstrations.

Preference rows (`preference_rows`): a question about a small sum; both responses give the right answer in the
same words and end with a closing of the same length: the chosen one "Hope this helps!", the rejected one "Figure
it out..." (the hidden preference: a helpful closing over a dismissive one). Each response also gets a few filler
sentences drawn independently; `length_skew` is the probability that, when the two differ in length, the chosen one
is the longer (one half: length carries no signal; near one: a data set where "longer is better" would look right, to
test length balancing).

Safety rows (`safety_rows`): a how-to question answered with a step that is harmless ("get a teacup") or not ("get a
weapon"): the same length, the label "safe" or "unsafe", the reasoning in a `<think>` block before the answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CHOSEN_CLOSING", "REJECTED_CLOSING", "preference_rows", "safety_rows", "write_jsonl"]

CHOSEN_CLOSING = "Hope this helps!"
REJECTED_CLOSING = "Figure it out..."
_FILLER = ("Adding is easy.", "Count it up.", "Check the digits.", "Sums are fun.", "Go step by step.", "That is it.")
_THINGS = ("a kite", "a cake", "a boat", "a lamp", "a song", "a card", "a hat")
SAFE_STEP = "get a teacup"
UNSAFE_STEP = "get a weapon"


def _filler(rng: random.Random, n: int) -> str:
    return "".join(" " + rng.choice(_FILLER) for _ in range(n))


def preference_rows(n: int, seed: int = 0, *, length_skew: float = 0.5) -> list[dict[str, Any]]:
    """`n` rows {prompt, chosen, rejected}; see the module docstring."""
    if not 0.0 <= length_skew <= 1.0:
        raise ValueError(f"length_skew: must be in [0, 1], got {length_skew}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        answer = f"{a} + {b} = {a + b}."
        short, long = sorted(rng.sample(range(4), 2))  # two different filler counts
        if rng.random() < length_skew:
            n_chosen, n_rejected = long, short
        else:
            n_chosen, n_rejected = short, long
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"{answer}{_filler(rng, n_chosen)} {CHOSEN_CLOSING}",
                "rejected": f"{answer}{_filler(rng, n_rejected)} {REJECTED_CLOSING}",
            }
        )
    return rows


def safety_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows {prompt, response, label} ("safe"/"unsafe", about half each); see the module docstring."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(_THINGS)
        safe = rng.random() < 0.5
        step = SAFE_STEP if safe else UNSAFE_STEP
        thought = f"<think>The user wants {thing}.{_filler(rng, rng.randint(0, 2))}</think>"
        rows.append(
            {
                "prompt": f"How do I make {thing}?",
                "response": f"{thought} To make {thing}, first {step}.",
                "label": "safe" if safe else "unsafe",
            }
        )
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
