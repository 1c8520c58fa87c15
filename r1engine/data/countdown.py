"""Countdown (TinyZero's task): combine the given numbers with + - * / to reach the target.

    prompt:      "Using the numbers [3, 7, 25], make 46. Each number at most once; + - * / and parentheses."
    completion:  "<think>25+3=28 28... </think><answer>(25 - 7) * 3 - 8</answer>" ... scored by the "countdown" reward

Targets are built from a random expression over the numbers, so every problem has a solution (the worked solution
of `solution` is that expression). Held-out problems come from a separate random stream and are never trained on.
"""

from __future__ import annotations

import random

from r1engine.data.problem import Problem, ProblemStream


class CountdownTask:
    name = "countdown"
    accuracy_reward = "countdown"

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 50, num_eval: int = 200,
                 eval_seed: int = 12345):  # fmt: skip
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"task.min_digits/max_digits (numbers per problem): need 2 <= min <= max, got "
                             f"{min_numbers}, {max_numbers}")  # fmt: skip
        self.min_numbers, self.max_numbers, self.max_value = min_numbers, max_numbers, max_value
        rng = random.Random(eval_seed)
        self.eval_problems: list[Problem] = []
        seen: set[str] = set()
        while len(self.eval_problems) < num_eval:
            p = self._draw(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                self.eval_problems.append(p)
        self._eval_prompts = frozenset(seen)

    def _draw(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            expr, value = self._expression(numbers, rng)
            if value is not None and value.denominator == 1 and 0 < value <= 10 * self.max_value:
                target = int(value)
                prompt = (f"Using the numbers {numbers}, make {target}. Use each number at most once, with + - * / and "
                          "parentheses; give the expression as the answer.")  # fmt: skip
                return Problem(prompt, {"numbers": numbers, "target": target}, self.name, {"solution": expr})

    @staticmethod
    def _expression(numbers: list[int], rng: random.Random):
        from fractions import Fraction

        order = numbers[:]
        rng.shuffle(order)
        expr, value = str(order[0]), Fraction(order[0])
        for n in order[1:]:
            op = rng.choice("+-*/")
            if op == "/" and value % n != 0:
                op = "+"
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            expr = f"({expr}) {op} {n}" if op in "*/" and " " in expr else f"{expr} {op} {n}"
        return expr, value

    def train_problems(self, seed: int) -> ProblemStream:
        return ProblemStream(self, seed)

    @staticmethod
    def solution(problem: Problem, style: str = "compact") -> str:
        """The constructed expression in the R1 template (the cold-start SFT traces)."""
        expr = problem.extra["solution"]
        if style == "direct":
            return f"<answer>{expr}</answer>"
        return f"<think>{expr} = {problem.answer['target']}</think><answer>{expr}</answer>"
