"""Timeline simulation of a pipeline schedule (compiled core) and the published bubble formulas.

`simulate` runs `torch.ops.r1engine.pipeline_simulate`: every rank executes its ops in order, a compute op
starts when the rank is free and its inputs are there (same-rank producer, or the matching SEND + latency);
SEND is non-blocking and RECV posts a receive the consumer waits for (`blocking_recv=True`: the RECV itself
waits). The simulation checks every dependency, the per-pair message matching and deadlock freedom and raises
RuntimeError("pipeline schedule invalid: ...") on the first violation.

Costs follow the DualPipe README: `b` is the FULL backward of a chunk (input + weight gradients) and `w` its
weight part, so a deferred B costs b - w and its W costs w; `fb` is an overlapped F&B pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1engine import _ext
from r1engine.pipeline.schedule import Schedule


@dataclass(frozen=True)
class Costs:
    """Per-operation costs (any time unit). fb=None means no overlap gain (F&B = F + B)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    latency: float = 0.0

    def __post_init__(self) -> None:
        if min(self.f, self.b, self.w, self.latency) < 0 or self.w > self.b:
            raise ValueError(f"costs must be >= 0 with w <= b (w is part of the full backward b), got {self}")

    @property
    def overlapped(self) -> float:
        """The F&B cost actually used."""
        return self.f + self.b if self.fb is None else self.fb


@dataclass(frozen=True)
class SimResult:
    """Outcome of a simulation. Per-rank lists are indexed by pipeline rank."""

    makespan: float
    busy: list[float]  # sum of op costs of the rank
    finish: list[float]  # end of the rank's last op
    bubble: list[float]  # makespan - busy: idle time of the rank within the step
    peak_activations: list[int]  # max live (mb, stage) chunks: F done, B not yet
    peak_activations_w: list[int]  # same, a deferred chunk stays live until its W
    times: torch.Tensor  # float64 [num_ops, 2]: start, end of each op, rows in Schedule.to_tensors() order

    @property
    def max_bubble(self) -> float:
        """Largest per-rank bubble (what the published formulas give)."""
        return max(self.bubble)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all device time: sum(bubble) / (num_ranks * makespan)."""
        return sum(self.bubble) / (len(self.bubble) * self.makespan) if self.makespan > 0 else 0.0


def simulate(schedule: Schedule, costs: Costs | None = None, blocking_recv: bool = False) -> SimResult:
    """Simulate `schedule` under `costs`; raises RuntimeError naming the violation if the schedule is invalid."""
    costs = costs or Costs()
    _ext.require("pipeline_simulate")
    ops, offsets = schedule.to_tensors()
    times, per_rank, makespan = torch.ops.r1engine.pipeline_simulate(
        ops,
        offsets,
        schedule.kind,
        schedule.num_ranks,
        schedule.num_microbatches,
        costs.f,
        costs.b,
        costs.w,
        -1.0 if costs.fb is None else costs.fb,
        costs.latency,
        blocking_recv,
    )
    pr = per_rank.tolist()
    return SimResult(
        makespan=float(makespan),
        busy=[row[0] for row in pr],
        finish=[row[1] for row in pr],
        bubble=[row[2] for row in pr],
        peak_activations=[int(row[3]) for row in pr],
        peak_activations_w=[int(row[4]) for row in pr],
        times=times,
    )


def published_bubble(kind: str, num_stages: int, costs: Costs) -> float:
    """The DualPipe README's bubble for `num_stages` (PP) stages: 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W),
    DualPipe / DualPipeV (PP/2-1)(F&B+B-3W). B is the full backward. Note DualPipeV has PP/2 ranks."""
    pp = num_stages
    if kind == "1f1b":
        return (pp - 1) * (costs.f + costs.b)
    if kind == "zb1p":
        return (pp - 1) * (costs.f + costs.b - 2 * costs.w)
    if kind in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (costs.overlapped + costs.b - 3 * costs.w)
    raise ValueError(f"kind must be one of 1f1b, zb1p, dualpipe, dualpipev; got {kind!r}")
