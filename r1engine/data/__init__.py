"""Synthetic reasoning tasks with worked chains of thought, for cold-start SFT, GRPO and held-out evaluation."""

from r1engine.data.addition import SOLUTION_STYLES, AdditionTask, Problem

__all__ = ["SOLUTION_STYLES", "AdditionTask", "Problem", "get_task"]


def get_task(name: str, **options) -> AdditionTask:
    """The task named in the config (`task.name`)."""
    tasks = {"addition": AdditionTask}
    if name not in tasks:
        raise ValueError(f"task.name: unknown task {name!r} (known: {', '.join(tasks)})")
    return tasks[name](**options)
