"""Data sets from files, read with the Hugging Face `datasets` library: JSONL, JSON, parquet, CSV (optionally gzipped)
and `save_to_disk` directories, several files at once.

The layouts of verl and TRL read as they are:

    verl   prompt: [{"role": "user", "content": ...}], reward_model: {"ground_truth": ...}, data_source: "gsm8k"
    TRL    prompt: "..." or [{"role": ..., "content": ...}], solution: "..." (or answer: ...)

`data.prompt_key`, `data.answer_key` and `data.source_key` name the columns (dotted for nested fields, as
`reward_model.ground_truth`; `answer_key` may list several columns, which then reach the rewards as one dict, as
HumanEval's `test` and `entry_point` do); left unset, the answer is the first of `reward_model.ground_truth`,
`solution`, `answer`, `ground_truth` that the rows have, and the source is `data_source` when they have it. Without
eval files a held-out split of `data.eval_size` rows is drawn once with a fixed seed, so it is the same in every run
and never trained on. Errors name the config key, the file and the row.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r1engine.data.problem import EpochStream, Problem

log = logging.getLogger(__name__)

ANSWER_KEYS = ("reward_model.ground_truth", "solution", "answer", "ground_truth")
SOURCE_KEY = "data_source"
EVAL_SPLIT_SEED = 20250120  # the held-out split is a property of the data, not of a run's seed
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data set that cannot be used; the message names the config key, and the file and row where it applies."""


def _builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        known = ", ".join(sorted(_BUILDERS))
        raise DataError(f"{path}: unknown file type (known: {known}, gzipped too, or a save_to_disk directory)")
    return builder


def read_table(path: str | Path, key: str):
    """One file or `save_to_disk` directory as a `datasets.Dataset`."""
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key}: {str(p)!r} does not exist")
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars of a local file are noise in a training log
    try:
        if p.is_dir():
            table = datasets.load_from_disk(str(p))
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table and len(table) != 1:
                    raise DataError(f"{key}: {p} holds the splits {sorted(table)}; name one (a directory per split)")
                table = table["train"] if "train" in table else next(iter(table.values()))
            return table
        return datasets.load_dataset(_builder(p), data_files=str(p), split="train")
    except DataError:
        raise
    except Exception as exc:  # the datasets library raises many types for unreadable files
        if "corresponds to no data" in str(exc) or (p.is_file() and p.stat().st_size == 0):
            raise DataError(f"{key}: {p} has no rows") from exc
        raise DataError(f"{key}: cannot read {p}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        if shown:
            datasets.enable_progress_bars()


def _as_table(item: Any, key: str, index: int):
    """(table, name for messages) of a file path, a `datasets.Dataset` or a list of row dicts."""
    import datasets

    if isinstance(item, str | Path):
        return read_table(item, key), str(item)
    if isinstance(item, datasets.Dataset):
        return item, f"{key}[{index}] (a datasets.Dataset)"
    if isinstance(item, list | tuple) and all(isinstance(r, dict) for r in item):
        if not item:
            raise DataError(f"{key}[{index}]: an empty list of rows")
        return datasets.Dataset.from_list(list(item)), f"{key}[{index}] (a list of rows)"
    raise DataError(f"{key}[{index}]: expected a file path, a datasets.Dataset or a list of row dicts, got "
                    f"{type(item).__name__}")  # fmt: skip


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _has_column(columns: Sequence[str], dotted: str, first_row: dict[str, Any] | None) -> bool:
    if dotted.split(".")[0] not in columns:
        return False
    if first_row is None or "." not in dotted:
        return True
    try:
        _get(first_row, dotted)
        return True
    except KeyError:
        return False


def _resolve_answer_key(answer_key: str | list[str] | None, columns: Sequence[str], first: dict | None, where: str):
    if answer_key is not None:
        keys = [answer_key] if isinstance(answer_key, str) else list(answer_key)
        missing = [k for k in keys if not _has_column(columns, k, first)]
        if missing:
            raise DataError(f"data.answer_key: no column {missing[0]!r} in {where} (columns: {', '.join(columns)})")
        return answer_key
    for candidate in ANSWER_KEYS:
        if _has_column(columns, candidate, first):
            return candidate
    raise DataError(
        f"data.answer_key: {where} has none of {', '.join(ANSWER_KEYS)}; name the answer column "
        f"(columns: {', '.join(columns)})"
    )


def read_problems(
    files: Sequence[Any],
    *,
    key: str,
    prompt_key: str = "prompt",
    answer_key: str | list[str] | None = None,
    source_key: str | None = None,
) -> list[Problem]:
    """Every row of `files` as a `Problem` (see the module docstring); `key` is the config key naming the files.
    An entry may also be a `datasets.Dataset` or a list of row dicts (a caller's data, `GRPOTrainer(dataset=...)`)."""
    problems: list[Problem] = []
    for n, item in enumerate(files):
        table, f = _as_table(item, key, n)
        columns = list(table.column_names)
        if len(table) == 0:
            raise DataError(f"{key}: {f} has no rows")
        first = table[0]
        if not _has_column(columns, prompt_key, first):
            raise DataError(f"data.prompt_key: no column {prompt_key!r} in {f} (columns: {', '.join(columns)})")
        answers = _resolve_answer_key(answer_key, columns, first, f)
        source = source_key if source_key is not None else (SOURCE_KEY if SOURCE_KEY in columns else None)
        if source is not None and not _has_column(columns, source, first):
            raise DataError(f"data.source_key: no column {source!r} in {f} (columns: {', '.join(columns)})")
        answer_keys = [answers] if isinstance(answers, str) else list(answers)
        used = {prompt_key.split(".")[0], *(a.split(".")[0] for a in answer_keys)}
        for i, row in enumerate(table):
            try:
                prompt = _get(row, prompt_key)
                values = {k.split(".")[-1]: _get(row, k) for k in answer_keys}
            except KeyError as exc:
                raise DataError(f"{key}: {f}, row {i}: no {exc.args[0]!r}") from None
            answer = values[answers.split(".")[-1]] if isinstance(answers, str) else values
            if any(v is None or (isinstance(v, str) and not v.strip()) for v in values.values()):
                raise DataError(f"data.answer_key: {f}, row {i}: the answer ({answers!r}) is missing")
            if not prompt or (isinstance(prompt, str) and not prompt.strip()):
                raise DataError(f"data.prompt_key: {f}, row {i}: the prompt ({prompt_key!r}) is empty")
            row_source = str(_get(row, source)) if source is not None else ""
            extra = {k: v for k, v in row.items() if k not in used}
            problems.append(Problem(prompt=prompt, answer=answer, source=row_source, extra=extra))
    return problems


class DatasetTask:
    """A data set as the trainer's task: held-out `eval_problems` and an epoch-shuffled training stream."""

    name = "dataset"

    def __init__(
        self,
        train_files: Sequence[str],
        eval_files: Sequence[str] = (),
        *,
        prompt_key: str = "prompt",
        answer_key: str | list[str] | None = None,
        source_key: str | None = None,
        eval_size: int = 200,
        shuffle: bool = True,
    ) -> None:
        if not train_files:
            raise DataError("data.train_files: no files given")
        columns = dict(prompt_key=prompt_key, answer_key=answer_key, source_key=source_key)
        train = read_problems(train_files, key="data.train_files", **columns)
        if eval_files:
            self.eval_problems = read_problems(eval_files, key="data.eval_files", **columns)
        else:
            if eval_size >= len(train):
                raise DataError(
                    f"data.eval_size: {eval_size} held-out rows would leave nothing to train on ({len(train)} rows in "
                    "data.train_files); lower it or give data.eval_files"
                )
            order = list(range(len(train)))
            random.Random(EVAL_SPLIT_SEED).shuffle(order)
            held = set(order[:eval_size])
            self.eval_problems = [train[i] for i in sorted(held)]
            train = [p for i, p in enumerate(train) if i not in held]
        self.train = train
        self.shuffle = shuffle

    @property
    def sources(self) -> set[str]:
        return {p.source for p in self.train} | {p.source for p in self.eval_problems}

    def train_problems(self, seed: int) -> EpochStream:
        return EpochStream(self.train, seed, self.shuffle)

    def drop_long_prompts(self, length: Callable[[Any], int], max_tokens: int, mode: str = "drop") -> dict[str, int]:
        """Drop (or, with `mode="error"`, refuse) rows whose templated prompt is longer than `max_tokens` tokens;
        returns how many were dropped from the training and held-out rows."""
        dropped = {}
        for name in ("train", "eval_problems"):
            kept = []
            for i, p in enumerate(getattr(self, name)):
                n = length(p.prompt)
                if n <= max_tokens:
                    kept.append(p)
                elif mode == "error":
                    raise DataError(
                        f"data.max_prompt_tokens: {'training' if name == 'train' else 'held-out'} row {i} has a "
                        f"{n}-token prompt (> {max_tokens}); raise data.max_prompt_tokens (and training.chunk_len) or "
                        "set data.overlong_prompts=drop"
                    )
            dropped[name] = len(getattr(self, name)) - len(kept)
            setattr(self, name, kept)
        if not self.train:
            raise DataError(f"data.max_prompt_tokens: every training prompt is longer than {max_tokens} tokens")
        if dropped["train"] or dropped["eval_problems"]:
            log.warning(
                "data.max_prompt_tokens=%d: dropped %d training and %d held-out rows with longer prompts",
                max_tokens, dropped["train"], dropped["eval_problems"],
            )  # fmt: skip
        return {"data/dropped_train": dropped["train"], "data/dropped_eval": dropped["eval_problems"]}
