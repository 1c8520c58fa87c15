"""Reward-model training data: preference pairs and safety labels from JSONL/JSON/parquet/CSV files (or
`save_to_disk` directories) read through the project's data-set reader (`r1engine.data.dataset.read_table`), and the
length balancing of preference pairs.

Preference rows: a prompt (text or chat messages), a chosen and a rejected response (text, or chat messages whose
last turn is the response, as TRL's conversational preference sets store them). Label rows: a prompt, a response and
a label: "safe"/"unsafe" (any case), true/false or 1/0 (1: safe). The columns are named by `data.prompt_key`,
`data.chosen_key`, `data.rejected_key`, `data.response_key` and `data.label_key`. Errors name the key, the file and
the row: a missing column, an empty field, a chosen response equal to the rejected one, a label that is not one of
those values.

Length balancing (`length_balance`): a preference set whose chosen responses are mostly the longer ones teaches a
reward model that longer is better, which the policy then exploits by padding its answers (the R1 paper made the
chosen and rejected responses of its set comparable in length). The pairs are grouped by how much their lengths
differ (buckets of |log(len_chosen / len_rejected)|, `LENGTH_BUCKETS`) and, within each bucket, the pairs whose chosen
response is the longer are made to weigh exactly as much as those whose chosen response is the shorter:
"weight" scales the weights of the two sides (a bucket with only one side gets weight 0: no weighting can balance it),
"drop" keeps a random subset of the larger side as large as the smaller side; pairs of equal length keep weight 1.
After it, "the longer response wins" is right on exactly half of the weighted pairs of every bucket, at every size of
the length difference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1engine.data.dataset import DataError, read_table

__all__ = [
    "LENGTH_BUCKETS",
    "LabeledResponse",
    "PreferencePair",
    "length_balance",
    "read_labels",
    "read_preferences",
]

LENGTH_BUCKETS = (0.1, 0.25, 0.5, 1.0)
"""Edges of |log(len_chosen / len_rejected)| between the length-balancing buckets (finer where lengths are close)."""
_SAFE = {"safe": True, "unsafe": False, "true": True, "false": False}


@dataclass
class PreferencePair:
    prompt: Any
    chosen: str
    rejected: str
    where: str
    """The file and row, for messages."""


@dataclass
class LabeledResponse:
    prompt: Any
    response: str
    safe: bool
    where: str


def _tables(files: Sequence[Any], key: str):
    """(table or list of rows, name for messages) per entry: a path, or a list of row dicts (a caller's data)."""
    if not files:
        raise DataError(f"{key}: no files given")
    for n, item in enumerate(files):
        if isinstance(item, str | Path):
            table = read_table(item, key)
            yield list(table.column_names), table, str(item)
        elif isinstance(item, list | tuple) and all(isinstance(r, dict) for r in item):
            columns = sorted({c for r in item for c in r})
            yield columns, item, f"{key}[{n}] (a list of rows)"
        else:
            raise DataError(f"{key}[{n}]: expected a file path or a list of row dicts, got {type(item).__name__}")


def _require_columns(columns: list[str], names: dict[str, str], where: str) -> None:
    for config_key, column in names.items():
        if column not in columns:
            raise DataError(f"{config_key}: no column {column!r} in {where} (columns: {', '.join(columns)})")


def _text(value: Any, column: str, where: str) -> str:
    """A response: text, or chat messages whose last turn's content is the response."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column!r} is missing or empty (got {value!r:.60})")
    return value


def _rows(files: Sequence[Any], key: str, names: dict[str, str]) -> Iterator[tuple[dict, str]]:
    """Every row of `files` with the place to name in errors, each file checked for rows and for the columns
    `names` ({config key: column})."""
    for columns, rows, f in _tables(files, key):
        if len(rows) == 0:
            raise DataError(f"{key}: {f} has no rows")
        _require_columns(columns, names, f)
        for i, row in enumerate(rows):
            yield row, f"{key}: {f}, row {i}"


def _prompt(value: Any, column: str, where: str) -> Any:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("content") for m in value):
        return value
    raise DataError(f"{where}: {column!r} is missing or empty (text or chat messages expected, got {value!r:.60})")


def read_preferences(
    files: Sequence[Any],
    *,
    key: str = "data.train_files",
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
) -> list[PreferencePair]:
    """Every row of `files` as a `PreferencePair` (see the module docstring)."""
    pairs: list[PreferencePair] = []
    names = {"data.prompt_key": prompt_key, "data.chosen_key": chosen_key, "data.rejected_key": rejected_key}
    for row, where in _rows(files, key, names):
        prompt = _prompt(row.get(prompt_key), prompt_key, where)
        chosen = _text(row.get(chosen_key), chosen_key, where)
        rejected = _text(row.get(rejected_key), rejected_key, where)
        if chosen.strip() == rejected.strip():
            raise DataError(
                f"{where}: {chosen_key!r} and {rejected_key!r} are the same text; a preference pair needs two "
                "different responses"
            )
        pairs.append(PreferencePair(prompt, chosen, rejected, where))
    return pairs


def _label(value: Any, column: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _SAFE:
        return _SAFE[value.strip().lower()]
    raise DataError(f"{where}: {column!r} must be safe/unsafe, true/false or 1/0 (1: safe), got {value!r:.60}")


def read_labels(
    files: Sequence[Any],
    *,
    key: str = "data.train_files",
    prompt_key: str = "prompt",
    response_key: str = "response",
    label_key: str = "label",
) -> list[LabeledResponse]:
    """Every row of `files` as a `LabeledResponse` (see the module docstring)."""
    out: list[LabeledResponse] = []
    names = {"data.prompt_key": prompt_key, "data.response_key": response_key, "data.label_key": label_key}
    for row, where in _rows(files, key, names):
        prompt = _prompt(row.get(prompt_key), prompt_key, where)
        response = _text(row.get(response_key), response_key, where)
        out.append(LabeledResponse(prompt, response, _label(row.get(label_key), label_key, where), where))
    return out


def length_balance(
    chosen_len: Sequence[int] | torch.Tensor,
    rejected_len: Sequence[int] | torch.Tensor,
    mode: str = "weight",
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weights `[n]` (float32; 0 leaves a pair out) that balance the pairs by length (see the module docstring), and
    statistics: the share of the pairs of unequal length whose chosen response is the longer, before and after
    (weighted), and the pairs left out."""
    if mode not in ("weight", "drop", "none"):
        raise ValueError(f"data.length_balance: must be one of weight, drop, none, got {mode!r}")
    lc = torch.as_tensor(chosen_len, dtype=torch.float64)
    lr = torch.as_tensor(rejected_len, dtype=torch.float64)
    if lc.shape != lr.shape or lc.dim() != 1:
        raise ValueError(
            f"chosen_len and rejected_len: expected two [n] lengths, got {tuple(lc.shape)}, {tuple(lr.shape)}"
        )
    if bool((lc < 1).any() | (lr < 1).any()):
        raise ValueError("chosen_len and rejected_len: every length must be >= 1")
    n = lc.numel()
    weights = torch.ones(n, dtype=torch.float64)
    ratio = torch.log(lc / lr)
    longer, shorter = ratio > 0, ratio < 0
    bucket = torch.bucketize(ratio.abs(), torch.tensor(LENGTH_BUCKETS, dtype=torch.float64))
    rng = random.Random(seed)
    if mode != "none":
        for b in bucket.unique().tolist():
            up = (longer & (bucket == b)).nonzero().flatten().tolist()
            down = (shorter & (bucket == b)).nonzero().flatten().tolist()
            if not up and not down:
                continue
            if not up or not down:
                weights[up + down] = 0.0
            elif mode == "weight":
                total = len(up) + len(down)
                weights[up] = total / (2 * len(up))
                weights[down] = total / (2 * len(down))
            else:
                big = up if len(up) > len(down) else down
                dropped = rng.sample(big, len(big) - min(len(up), len(down)))
                weights[dropped] = 0.0

    def longer_share(w: torch.Tensor) -> float:
        unequal = float(w[longer | shorter].sum())
        return float(w[longer].sum()) / unequal if unequal > 0 else math.nan

    stats = {
        "data/chosen_longer_frac": longer_share(torch.ones(n, dtype=torch.float64)),
        "data/chosen_longer_frac_balanced": longer_share(weights),
        "data/pairs_left_out": float((weights == 0).sum()),
    }
    return weights.float(), stats
