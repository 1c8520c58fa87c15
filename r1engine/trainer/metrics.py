"""Per-step metrics: a JSONL log (one object per line, appended and flushed so a crash loses nothing),
optional TensorBoard, and PNG plots of the curves people look at."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

# The panels of the summary figure: (title, metric keys drawn in it).
PLOT_PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["reward/mean", "reward/arithmetic/mean", "reward/accuracy/mean", "reward/format/mean"]),
    ("held-out accuracy", ["eval/accuracy", "eval/greedy_accuracy"]),
    ("KL to reference", ["loss/kl_mean"]),
    ("response length (tokens)", ["rollout/response_len_mean"]),
    ("clip fraction", ["loss/clip_frac"]),
    ("MTP acceptance rate", ["rollout/acceptance_rate"]),
]


class MetricsLogger:
    """Appends one JSON record per step to `output_dir/metrics.jsonl`.

    `resume_step`: the step of the checkpoint a run resumes from; the records past it are dropped (they will be
    produced again, identically), the rest kept. Without it the log starts empty: an existing metrics.jsonl with
    records (a previous run's history) is never truncated, it raises FileExistsError instead (the trainer moves a
    previous run aside first when told to start over, see `CheckpointManager.set_aside_previous_run`)."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = False, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")  # replaced atomically: a crash keeps the old log
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists() and self.path.stat().st_size > 0:
            raise FileExistsError(
                f"{self.path}: holds the metrics of a previous run; a new log (resume_step=None) does not overwrite "
                "them: move the file away, or pass the resume_step of the checkpoint the run continues from"
            )
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file. A damaged last line (a crash in the middle of writing it) is left out
    with a warning; a damaged line before it is an error naming the file and the line."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                logging.getLogger(__name__).warning("%s: line %d is cut short (left out): %s", path, n, exc)
                break
            raise ValueError(f"{path}: line {n} is not a JSON record ({exc})") from None
    return records


HACKING_PANEL = "reward hacking monitor"
"""The panel that shows each reward model's mean score beside the rule-checked held-out accuracy (left axis) and the
mean response length (right axis), with the step the reward models switch on: a model score that climbs while the
accuracy falls or the length runs away is the reward hacking R1 saw with long exposure to model rewards."""


def reward_model_keys(records: list[dict[str, Any]]) -> list[str]:
    """The reward models' curves present in `records`, sorted: `reward/rm/<name>/mean` (the reward) and, for a
    single-input helpfulness model, `reward/rm/<name>/score_mean` (its raw score, which moves when the policy does;
    the mean of pairwise rewards within a group does not)."""
    return sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if k.startswith("reward/rm/") and k.endswith(("/mean", "/score_mean")) and v is not None
        }
    )


def _hacking_monitor(ax: Any, records: list[dict[str, Any]]) -> None:
    """The response length on a second axis and a line at the first step the reward models count."""
    on = [r["step"] for r in records if r.get("reward/rm/active")]
    if on:
        ax.axvline(min(on), color="grey", linestyle=":", linewidth=1)
    points = [(r["step"], r["rollout/response_len_mean"]) for r in records if r.get("rollout/response_len_mean")]
    if points:
        xs, ys = zip(*points, strict=True)
        twin = ax.twinx()
        twin.plot(xs, ys, color="black", linestyle="--", linewidth=1, label="response length (tokens)")
        twin.set_ylabel("response length", fontsize=7)
        twin.legend(fontsize=7, loc="lower right")


def _per_name_keys(records: list[dict[str, Any]], panel: str) -> list[str]:
    """Curves a panel gains from the run's own metrics: every rule reward's mean (`reward/<name>/mean`) in the reward
    panel, the held-out accuracy per data source (`eval/accuracy/<source>`) in the accuracy panel."""
    fixed = {k for _, keys in PLOT_PANELS for k in keys}
    present = sorted({k for r in records for k, v in r.items() if v is not None} - fixed)
    if panel == "reward":
        return [k for k in present if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2]
    if panel == "held-out accuracy":
        return [k for k in present if k.startswith("eval/accuracy/")]
    return []


def plot_metrics(records: list[dict[str, Any]], out_path: str | Path, title: str = "GRPO training") -> Path:
    """Write a grid of the standard curves (panels whose metrics never appear are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, keys + _per_name_keys(records, name))
        for name, keys in PLOT_PANELS
        if any(k in r and r[k] is not None for r in records for k in keys + _per_name_keys(records, name))
    ]
    rm_keys = reward_model_keys(records)
    if rm_keys:  # the reward-hacking monitor: reward-model scores against the rule-checked accuracy and the length
        panels.append((HACKING_PANEL, [*rm_keys, "eval/accuracy"]))
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key], r.get(f"{key}_stderr")) for r in records if r.get(key) is not None]
            if points:
                xs, ys, errs = zip(*points, strict=True)
                marker = "o" if len(points) < 30 else None
                if all(e is not None and math.isfinite(e) for e in errs):  # a mean with its standard error
                    ax.errorbar(xs, ys, yerr=errs, marker=marker, markersize=3, capsize=3, label=key)
                else:
                    ax.plot(xs, ys, marker=marker, markersize=3, label=key)
        if name == HACKING_PANEL:
            _hacking_monitor(ax, records)
        ax.set_title(name)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
