"""Synthetic preference and safety data with a hidden rule that length cannot explain, for tests and demonstrations.

Preference rows (`preference_rows`): a question about a small sum; both responses give the right answer in the
same words and end with a closing of the same length: the chosen one "Hope this helps!", the rejected one "Figure
it out..." (the hidden preference: a helpful closing over a dismissive one). Each response also gets a few filler
sentences drawn independently; `length_skew` is the probability that, when the two differ in length, the chosen one
is the longer (one half: length carries no signal; near one: a data set where "longer is better" would look right, to
test length balancing).

Safety rows (`safety_rows`): a how-to question answered with a step that is harmless ("get a teacup") or not ("get a
weapon"): the same length, the label "safe" or "unsafe", the reasoning in a `<think>` block before the answer.

Second-person preference rows (`second_person_rows`): a request for advice ("Give me one tip for saving money.") or
a description ("Tell me about owls."), half each, answered with the same content twice, once addressed to the reader
("you", "your") and once impersonally ("it helps to", "people"); the chosen response is the one that speaks to the
reader. The second-person words appear at varied
places and the filler is drawn independently, so neither the position of a word nor the length gives the preference
away. `SECOND_PERSON_PATTERN` is the rule that knows this preference (the `pattern` reward's option), and
`general_prompt_rows` are requests of the same kind without responses, for RL on general prompts.

`python -m r1engine.reward_models.synthetic {preferences,safety,second_person,general_prompts} OUT --rows N` writes
a JSONL file of each kind.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CHOSEN_CLOSING",
    "REJECTED_CLOSING",
    "SECOND_PERSON_PATTERN",
    "general_prompt_rows",
    "preference_rows",
    "safety_rows",
    "second_person_rows",
    "write_jsonl",
]

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


SECOND_PERSON_PATTERN = r"\byou(r|rs|rself|'re|'ll|'d|'ve)?\b"
"""The second-person words, for the `pattern` reward (case-insensitive)."""

# (topic of the request, goal as a verb phrase, tips as verb phrases)
_ADVICE = (
    (
        "staying focused",
        "stay focused",
        (
            "turn off notifications",
            "work in short blocks",
            "keep a short to-do list",
            "clear the desk first",
            "take a break every hour",
        ),
    ),
    (
        "sleeping well",
        "sleep well",
        (
            "go to bed at the same time",
            "keep the room dark",
            "skip coffee after noon",
            "put the phone away early",
            "read a paper book before bed",
        ),
    ),
    (
        "learning a language",
        "learn a language",
        (
            "practice ten minutes a day",
            "label things at home",
            "watch films with subtitles",
            "speak with a partner",
            "write a short diary",
        ),
    ),
    (
        "saving money",
        "save money",
        (
            "cook at home",
            "write down every purchase",
            "wait a day before buying",
            "set up an automatic transfer",
            "cancel unused subscriptions",
        ),
    ),
    (
        "cooking rice",
        "cook rice well",
        (
            "rinse the rice first",
            "use a tight lid",
            "let it rest after cooking",
            "measure the water",
            "keep the heat low",
        ),
    ),
    (
        "writing an email",
        "write a clear email",
        (
            "put the request in the first line",
            "keep it short",
            "use a clear subject",
            "read it once before sending",
            "end with the next step",
        ),
    ),
    (
        "making friends",
        "make friends",
        (
            "join a club",
            "ask people questions",
            "say yes to invitations",
            "remember names",
            "follow up after meeting someone",
        ),
    ),
    (
        "keeping plants alive",
        "keep plants alive",
        (
            "check the soil before watering",
            "give them enough light",
            "use pots with holes",
            "water less in winter",
            "remove dead leaves",
        ),
    ),
    (
        "running a mile",
        "run a mile",
        (
            "start slowly",
            "breathe in a steady rhythm",
            "wear good shoes",
            "run a little further each week",
            "stretch after the run",
        ),
    ),
    (
        "reading more books",
        "read more books",
        (
            "carry a book everywhere",
            "read before sleeping",
            "set a page goal",
            "join a reading group",
            "quit boring books",
        ),
    ),
    (
        "cleaning a kitchen",
        "keep a kitchen clean",
        (
            "wipe the counters daily",
            "wash dishes right away",
            "empty the bin often",
            "clean from top to bottom",
            "store things in labelled boxes",
        ),
    ),
    (
        "packing for a trip",
        "pack for a trip",
        (
            "make a list first",
            "roll the clothes",
            "pack a spare charger",
            "wear the heaviest shoes",
            "leave room for souvenirs",
        ),
    ),
    (
        "studying for an exam",
        "study for an exam",
        (
            "start a week early",
            "take practice tests",
            "teach the topic to someone",
            "sleep before the exam",
            "study in short sessions",
        ),
    ),
    (
        "staying healthy",
        "stay healthy",
        ("walk every day", "drink enough water", "eat more vegetables", "get enough sleep", "see a doctor once a year"),
    ),
)
_ASKS = ("Give me one tip for {topic}.", "What is a good tip for {topic}?", "How can I {goal}?",
         "Any advice on {topic}?", "Share a tip for {topic}.")  # fmt: skip
# the same advice addressed to the reader (chosen) and impersonally (rejected); {tip} is a verb phrase
_SECOND_PERSON = (
    "You should {tip}.",
    "If you want to {goal}, {tip}.",
    "Your best move is to {tip}.",
    "Try to {tip}; it will help you {goal}.",
    "The simplest habit for you: {tip}.",
    "To {goal}, you can {tip}.",
)
_IMPERSONAL = (
    "It is best to {tip}.",
    "Anyone who wants to {goal} should {tip}.",
    "The best move is to {tip}.",
    "A good habit is to {tip}; it helps to {goal}.",
    "The simplest habit: {tip}.",
    "To {goal}, it helps to {tip}.",
)
_NEUTRAL = ("It takes little time.", "Many people find it useful.", "It is a simple habit.", "Small steps add up.",
            "It works for most people.", "Consistency matters most.")  # fmt: skip


# descriptions: (thing, something a reader could do to see it, facts as clauses)
_FACTS = (
    ("the moon", "look at the night sky", ("the moon reflects light from the sun",
                                           "the moon changes shape over a month",
                                           "the moon pulls on the ocean tides")),
    ("a rainbow", "stand with the sun behind you", ("a rainbow splits sunlight into colours",
                                                     "a rainbow needs rain and sun at once",
                                                     "a rainbow is really a full circle")),
    ("the ocean", "walk along a beach", ("the ocean covers most of the planet", "the ocean holds most of the water",
                                         "the ocean rises and falls twice a day")),
    ("a bicycle", "ride through a town", ("a bicycle turns pedal power into motion", "a bicycle needs no fuel",
                                          "a bicycle stays up because it moves")),
    ("autumn", "walk in a park in October", ("autumn leaves turn red and gold", "autumn days get shorter",
                                             "autumn brings cool mornings")),
    ("a library", "visit a town centre", ("a library lends books for free", "a library keeps old newspapers",
                                          "a library offers quiet rooms")),
    ("rain", "watch a storm", ("rain comes from clouds of tiny drops", "rain fills rivers and lakes",
                               "rain cleans dust from the air")),
    ("a mountain", "travel to the Alps", ("a mountain gets colder near the top",
                                          "a mountain takes millions of years to form",
                                          "a mountain shapes the weather around it")),
    ("bees", "walk through a garden", ("bees carry pollen from flower to flower", "bees make honey from nectar",
                                       "bees dance to share where food is")),
    ("a volcano", "visit Iceland", ("a volcano releases melted rock", "a volcano can build new land",
                                    "a volcano may sleep for centuries")),
    ("owls", "walk in a forest at night", ("owls hunt at night", "owls fly almost without sound",
                                           "owls turn their heads far around")),
    ("bread", "visit a bakery", ("bread rises because yeast makes gas", "bread needs flour, water and salt",
                                 "bread was baked thousands of years ago")),
)  # fmt: skip
_DESCRIBE = ("Describe {thing} in two sentences.", "Tell me about {thing}.", "What is interesting about {thing}?",
             "Explain {thing} briefly.")  # fmt: skip
# (addressed to the reader, impersonal): the same sentence shape on both sides
_FACT_SENTENCES = (
    ("When you {observe}, you can see that {fact}.", "When people {observe}, they can see that {fact}."),
    ("You might know that {fact}.", "It is well known that {fact}."),
    ("Here is a fact for you: {fact}.", "Here is a fact: {fact}."),
    ("As you may have noticed, {fact}.", "As many have noticed, {fact}."),
    ("If you {observe}, remember that {fact}.", "For anyone who likes to {observe}: {fact}."),
)
_NEUTRAL_FACTS = ("It is a familiar sight.", "Many find it fascinating.", "There is more to learn about it.",
                  "Science explains much of it.", "It has a long history.", "It is worth a closer look.")  # fmt: skip


def _request(rng: random.Random) -> tuple[str, str, str, tuple[str, ...]]:
    """A general request (advice or a description, half each) with the same answer addressed to the reader and
    impersonally, and the neutral filler sentences that fit it."""
    if rng.random() < 0.5:
        topic, goal, tips = rng.choice(_ADVICE)
        tip, k = rng.choice(tips), rng.randrange(len(_SECOND_PERSON))
        prompt = rng.choice(_ASKS).format(topic=topic, goal=goal)
        addressed, impersonal = (t[k].format(tip=tip, goal=goal) for t in (_SECOND_PERSON, _IMPERSONAL))
        return prompt, addressed, impersonal, _NEUTRAL
    thing, observe, facts = rng.choice(_FACTS)
    fact, (addressed, impersonal) = rng.choice(facts), rng.choice(_FACT_SENTENCES)
    prompt = rng.choice(_DESCRIBE).format(thing=thing)
    if "you" in observe:  # "stand with the sun behind you" would put a "you" into the impersonal side
        impersonal = "It is well known that {fact}."
    return (
        prompt,
        addressed.format(observe=observe, fact=fact),
        impersonal.format(observe=observe, fact=fact),
        (_NEUTRAL_FACTS),
    )


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def second_person_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows {prompt, chosen, rejected}: the same answer addressed to the reader (chosen) or impersonally."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, addressed, impersonal, neutral = _request(rng)
        sides = []
        for sentence in (addressed, impersonal):  # filler drawn independently for each side, no sentence twice
            before, after = rng.randint(0, 1), rng.randint(0, 2)
            filler = rng.sample(neutral, before + after)
            sides.append(" ".join([*filler[:before], _sentence_case(sentence), *filler[before:]]))
        rows.append({"prompt": prompt, "chosen": sides[0], "rejected": sides[1]})
    return rows


def general_prompt_rows(n: int, seed: int = 0, *, source: str = "general") -> list[dict[str, Any]]:
    """`n` general requests (advice or descriptions) as training rows {prompt, solution, data_source}: `solution` is
    an impersonal reference response (for the pairing "reference"; nothing checks it), `data_source` routes the rows
    to the general rewards."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, _, impersonal, _ = _request(rng)
        rows.append({"prompt": prompt, "solution": _sentence_case(impersonal), "data_source": source})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


_KINDS = {
    "preferences": preference_rows,
    "safety": safety_rows,
    "second_person": second_person_rows,
    "general_prompts": general_prompt_rows,
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic reward-model or prompt data (see the module doc).")
    parser.add_argument("kind", choices=sorted(_KINDS))
    parser.add_argument("out", help="output .jsonl file")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows: must be >= 1, got {args.rows}")
    print(write_jsonl(_KINDS[args.kind](args.rows, args.seed), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
