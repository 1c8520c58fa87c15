"""Tasks: data sets read from files (`data.*`) and built-in generators with worked chains of thought (addition,
countdown), for cold-start SFT, GRPO and held-out evaluation; prompt templates."""

from r1engine.data.addition import SOLUTION_STYLES, AdditionTask
from r1engine.data.countdown import CountdownTask
from r1engine.data.dataset import DataError, DatasetTask
from r1engine.data.problem import EpochStream, NumberedStream, Problem, ProblemStream
from r1engine.data.templates import PromptTemplate, TemplateError

__all__ = [
    "SOLUTION_STYLES",
    "AdditionTask",
    "CountdownTask",
    "DataError",
    "DatasetTask",
    "EpochStream",
    "NumberedStream",
    "Problem",
    "ProblemStream",
    "PromptTemplate",
    "TemplateError",
    "get_task",
]

GENERATORS = {"addition": AdditionTask, "countdown": CountdownTask}


def get_task(name: str, **options):
    """A built-in generator task by name (`task.name`)."""
    if name not in GENERATORS:
        raise ValueError(f"task.name: unknown task {name!r} (known: {', '.join(GENERATORS)}, or data.train_files)")
    return GENERATORS[name](**options)
