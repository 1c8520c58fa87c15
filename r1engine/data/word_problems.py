"""Arithmetic word problems generated locally, written as a data file in the layout a user would bring (TRL's JSONL
or verl's parquet), for the real-model example (configs/smollm2_math.yaml):

    python -m r1engine.data.word_problems data/word_problems.jsonl --rows 3000              # TRL layout
    python -m r1engine.data.word_problems data/word_problems.parquet --layout verl         # verl layout

One or two steps of + - x with small numbers ("Mia has 7 apples. She buys 5 more. How many apples does she have
now?"), the level a 135M-parameter instruct model answers right some of the time, which is what RL needs to start.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ana", "Ben", "Kim", "Raj", "Lea", "Ella")
OBJECTS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "cards", "shells", "stamps")
SOURCE = "word_problems"


def _pronoun(name: str) -> str:
    return "She" if name in ("Mia", "Ava", "Zoe", "Ivy", "Ana", "Kim", "Lea", "Ella") else "He"


def _one_step(rng: random.Random, max_number: int = 30) -> tuple[str, int]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    he = _pronoun(name)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, max_number), rng.randint(2, max_number)
        return f"{name} has {a} {obj}. {he} gets {b} more. How many {obj} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(5, max(5, max_number + 10))
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {obj}. {he} gives away {b}. How many {obj} does {name} have left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{name} has {a} boxes with {b} {obj} in each box. How many {obj} does {name} have in total?", a * b


def _two_steps(rng: random.Random) -> tuple[str, int]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    he = _pronoun(name)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {obj}. {he} buys {b} more and then gives {c} to a friend. How many {obj} does {name} "
            "have now?", a + b - c)  # fmt: skip


def generate(rows: int, seed: int = 0, two_step_frac: float = 0.3, max_number: int = 30) -> list[tuple[str, int]]:
    """`rows` distinct (question, answer) pairs, reproducible from `seed`: a `two_step_frac` share of two-step
    problems, the others one step with operands up to about `max_number`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    while len(out) < rows:
        question, answer = _two_steps(rng) if rng.random() < two_step_frac else _one_step(rng, max_number)
        if question not in seen:
            seen.add(question)
            out.append((question, answer))
    return out


def to_rows(pairs: list[tuple[str, int]], layout: str) -> list[dict[str, Any]]:
    """Rows in TRL's layout (prompt text, solution) or verl's (chat prompt, reward_model.ground_truth, data_source)."""
    if layout == "trl":
        return [{"prompt": q, "solution": str(a), "data_source": SOURCE} for q, a in pairs]
    if layout == "verl":
        return [
            {
                "data_source": SOURCE,
                "prompt": [{"role": "user", "content": q}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a)},
                "extra_info": {"index": i},
            }
            for i, (q, a) in enumerate(pairs)
        ]
    raise ValueError(f"layout must be 'trl' or 'verl', got {layout!r}")


def write(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSONL (`.jsonl`) or parquet (`.parquet`) through the `datasets` library."""
    import datasets

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(rows)
    if out.suffix == ".parquet":
        table.to_parquet(str(out))
    elif out.suffix == ".jsonl":
        table.to_json(str(out), lines=True)
    else:
        raise ValueError(f"path must end in .jsonl or .parquet, got {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output file (.jsonl or .parquet)")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("trl", "verl"), default="trl")
    parser.add_argument("--two-step-frac", type=float, default=0.3, help="share of two-step problems")
    parser.add_argument("--max-number", type=int, default=30, help="largest operand of one-step problems (about)")
    args = parser.parse_args(argv)
    pairs = generate(args.rows, args.seed, two_step_frac=args.two_step_frac, max_number=args.max_number)
    print(write(args.out, to_rows(pairs, args.layout)))


if __name__ == "__main__":
    main()
