"""`Problem`: one row of a task or data set, as the trainer consumes it, and `EpochStream`, the training order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    """A prompt, the reference its rewards compare against, where it comes from, and the row's other fields.

    `prompt`: text, or a list of chat messages (`{"role": ..., "content": ...}`) as verl and TRL store them.
    `answer`: what the correctness rewards get as the reference (a string, a number, a dict of test cases...).
    `source`: the row's data source (verl's `data_source`), which picks its rewards (`rewards.routes`).
    `extra`: the row's other columns, handed to custom rewards that accept them as keyword arguments.
    """

    prompt: Any
    answer: Any
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class EpochStream:
    """The training rows in a shuffled order, reshuffled each epoch (reproducibly from `seed`); its position is
    checkpointable (`state`), so a resumed run continues exactly where it stopped."""

    def __init__(self, problems: Sequence[Problem], seed: int, shuffle: bool = True) -> None:
        if not problems:
            raise ValueError("EpochStream: no problems to draw from")
        self.problems, self.seed, self.shuffle = list(problems), int(seed), bool(shuffle)
        self.epoch, self.index = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> Problem:
        if self.index == len(self.problems):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._order_of(self.epoch)
        problem = self.problems[self._order[self.index]]
        self.index += 1
        return problem

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_of(self.epoch)


class GeneratorTask(Protocol):
    """A task that draws problems from a random generator (addition, countdown), its held-out prompts excluded."""

    _eval_prompts: frozenset[str]

    def _draw(self, rng: random.Random) -> Problem: ...


class ProblemStream:
    """Training problems of a generator task, in a reproducible order, held-out prompts skipped; its position is
    checkpointable (`state`)."""

    def __init__(self, task: GeneratorTask, seed: int):
        self.task = task
        self.rng = random.Random(seed)

    def __iter__(self) -> ProblemStream:
        return self

    def __next__(self) -> Problem:
        while True:
            problem = self.task._draw(self.rng)
            if problem.prompt not in self.task._eval_prompts:
                return problem

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]

    def state(self) -> Any:
        return self.rng.getstate()

    def set_state(self, state: Any) -> None:
        self.rng.setstate(state)


class NumberedStream:
    """A training stream (`EpochStream`, `ProblemStream`) whose problems are numbered in the order drawn, so that a
    saved position can carry problems to pass over.

    The off-policy rollout modes take each step's batch ahead of time, and DAPO's extra rounds are taken behind the
    batches in flight but trained before them (`take(..., out_of_order=True)`). A checkpoint saves the position after
    the last trained batch (`state()` as it was then), which lies before those extra rounds' problems:
    `checkpoint_state(position)` adds their numbers, and a stream restored from it draws and drops them when it reaches
    them, so a resumed run neither trains them twice nor skips anything else. `last_numbers`: the numbers of the
    problems the last `take` gave."""

    def __init__(self, inner: EpochStream | ProblemStream) -> None:
        self.inner = inner
        self.count = 0  # problems drawn from `inner`
        self.last_numbers: list[int] = []
        self._pass_over: set[int] = set()  # numbers trained before the position this stream was restored to
        self._out_of_order: set[int] = set()

    @property
    def epoch(self) -> int | None:
        return getattr(self.inner, "epoch", None)

    def __iter__(self) -> NumberedStream:
        return self

    def __next__(self) -> Problem:
        """The next problem not trained already."""
        while True:
            problem, number = next(self.inner), self.count
            self.count += 1
            if number not in self._pass_over:
                return problem
            self._pass_over.discard(number)

    def take(self, n: int, *, out_of_order: bool = False) -> list[Problem]:
        """The next `n` problems (passing over those already trained); `out_of_order`: they are trained before
        problems taken earlier."""
        problems, numbers = [], []
        for _ in range(n):
            problems.append(next(self))
            numbers.append(self.count - 1)  # the last drawn is the one given
        self.last_numbers = numbers
        if out_of_order:
            self._out_of_order.update(numbers)
        return problems

    def state(self) -> dict[str, Any]:
        """The position now (restorable; a checkpoint saves `checkpoint_state` of an earlier one)."""
        return {"inner": self.inner.state(), "count": self.count, "pass_over": sorted(self._pass_over)}

    def checkpoint_state(self, position: dict[str, Any]) -> dict[str, Any]:
        """`position` (an earlier `state()`, that of the last trained batch) with the problems beyond it that are
        trained already: taken out of order since, or still to pass over."""
        start = position["count"]
        self._out_of_order = {i for i in self._out_of_order if i >= start}  # positions saved later only grow
        return dict(position, pass_over=sorted(self._out_of_order | set(position["pass_over"])))

    def set_state(self, state: dict[str, Any]) -> None:
        if "count" not in state or "inner" not in state:  # saved by a version without numbering: the inner state
            self.inner.set_state(state)
            return
        self.inner.set_state(state["inner"])
        self.count = int(state["count"])
        self._pass_over = {int(i) for i in state["pass_over"]}
        self._out_of_order = set()
