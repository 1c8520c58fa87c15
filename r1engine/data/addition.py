"""Multi-digit addition with a worked, column-by-column chain of thought in the R1 template.

    prompt:      "347+85="
    completion:  "<think>7+5+0=12 4+8+1=13 3+0+1=4</think><answer>432</answer>"               (style "compact")
                 "<think>ones 7+5+0=12 tens 4+8+1=13 hundreds 3+0+1=4</think><answer>432</answer>"  ("readable")
                 "<answer>432</answer>"                                                     ("direct", no reasoning)

Each step adds one column (digits from the right, plus the carry in) exactly as a person would, so a small
model can learn the method from a few hundred SFT steps, and RL has something left to sharpen: the carries.
Held-out problems are drawn from a separate random stream and excluded from training.
"""

from __future__ import annotations

import random

from r1engine.data.problem import Problem, ProblemStream

SOLUTION_STYLES = ("compact", "readable", "direct")
_COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands", "column")


class AdditionTask:
    name = "addition"
    accuracy_reward = "arithmetic"
    """The `r1engine.rewards` function that checks an answer to this task (used for held-out accuracy)."""

    def __init__(self, min_digits: int = 1, max_digits: int = 3, num_eval: int = 200, eval_seed: int = 12345):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"min_digits/max_digits: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}"
            )
        self.min_digits, self.max_digits = min_digits, max_digits
        rng = random.Random(eval_seed)
        self.eval_problems: list[Problem] = []
        seen: set[str] = set()
        while len(self.eval_problems) < num_eval:
            problem = self._draw(rng)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                self.eval_problems.append(problem)
        self._eval_prompts = frozenset(seen)

    def _draw(self, rng: random.Random) -> Problem:
        a, b = (self._number(rng) for _ in range(2))
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b), source=self.name)

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def train_problems(self, seed: int) -> ProblemStream:
        """An endless stream of training problems (held-out prompts skipped), reproducible from `seed`."""
        return ProblemStream(self, seed)

    @staticmethod
    def solution(problem: Problem, style: str = "compact") -> str:
        """The answer to `problem` in one of `SOLUTION_STYLES`: a worked chain of thought in the R1 template
        ("compact": digits only; "readable": each column named in words, what R1's cold-start traces aim for), or
        the bare answer ("direct": what most text on the web looks like; a base model's corpus mixes all three)."""
        if style not in SOLUTION_STYLES:
            raise ValueError(f"style: must be one of {SOLUTION_STYLES}, got {style!r}")
        a, b = problem.prompt.rstrip("=").split("+")
        ra, rb = a[::-1], b[::-1]
        steps, digits, carry = [], [], 0
        for i in range(max(len(ra), len(rb))):
            x = int(ra[i]) if i < len(ra) else 0
            y = int(rb[i]) if i < len(rb) else 0
            total = x + y + carry
            label = f"{_COLUMN_NAMES[min(i, len(_COLUMN_NAMES) - 1)]} " if style == "readable" else ""
            steps.append(f"{label}{x}+{y}+{carry}={total}")
            digits.append(total % 10)
            carry = total // 10
        if carry:
            digits.append(carry)
        answer = "".join(map(str, reversed(digits)))
        if style == "direct":
            return f"<answer>{answer}</answer>"
        return f"<think>{' '.join(steps)}</think><answer>{answer}</answer>"
