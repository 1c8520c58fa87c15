"""Timeline simulation of a pipeline schedule (compiled core) and the published bubble formulas.

`simulate` runs `torch.ops.r1engine.pipeline_simulate`: every rank executes its ops in order, a compute op
starts when the rank is free and its inputs are there (same-rank producer, or the matching SEND + latency).
Communication semantics (`comm`): 'async' (default, what the executor does: SEND is isend, RECV posts an irecv
and the consumer waits), 'blocking_recv' (the RECV itself waits for the message) and 'synchronous' (blocking
RECV and rendezvous SEND, i.e. plain blocking send/recv: the multi-rank schedules rely on non-blocking sends
and are reported as deadlocking there). The simulation checks every dependency, the per-pair message matching
and deadlock freedom and raises RuntimeError("pipeline schedule invalid: ...") on the first violation.

Costs follow the DualPipe README: `b` is the FULL backward of a chunk (input + weight gradients) and `w` its
weight part, so a deferred B costs b - w and its W costs w; `fb` is an overlapped F&B pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1engine import _ext
from r1engine.pipeline.schedule import Op, OpKind, Schedule


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


COMM_MODES = ("async", "blocking_recv", "synchronous")


def simulate(schedule: Schedule, costs: Costs | None = None, comm: str = "async", backend: str = "cpp") -> SimResult:
    """Simulate `schedule` under `costs`; raises RuntimeError naming the violation if the schedule is invalid.

    comm: 'async', 'blocking_recv' or 'synchronous' (see the module doc). backend: 'cpp' (compiled core, full
    verification) or 'python' (`simulate_reference`, the timing oracle; 'async' and 'blocking_recv' only).
    """
    costs = costs or Costs()
    if comm not in COMM_MODES:
        raise ValueError(f"comm must be one of {COMM_MODES}, got {comm!r}")
    if backend == "python":
        if comm == "synchronous":
            raise ValueError("backend='python' supports comm='async' and 'blocking_recv' only")
        return simulate_reference(schedule, costs, comm == "blocking_recv")
    if backend != "cpp":
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
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
        COMM_MODES.index(comm),
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


def _op_cost(op: Op, c: Costs) -> float:
    if op.kind == OpKind.F:
        return c.f
    if op.kind == OpKind.B:
        return c.b - c.w if op.defer_w else c.b
    if op.kind == OpKind.W:
        return c.w
    if op.kind == OpKind.FB:
        return c.overlapped - (c.w if op.defer_w else 0.0)
    return 0.0


def simulate_reference(schedule: Schedule, costs: Costs, blocking_recv: bool = False) -> SimResult:
    """Plain-Python timeline simulation with the same semantics as the compiled simulator (the test oracle for
    its timings). Checks only what timing needs: inputs exist (else it reports a deadlock) and FIFO matching."""
    s, nr = schedule, schedule.num_ranks
    done_f: dict[tuple[int, int], float] = {}
    done_b: dict[tuple[int, int], float] = {}
    sends: dict[tuple[int, int], list[tuple[tuple[int, int, bool], float]]] = {}
    posted: dict[int, dict[tuple[int, int, bool], tuple[tuple[int, int], int]]] = {r: {} for r in range(nr)}
    n_posts: dict[tuple[int, int], int] = {}
    pc, now = [0] * nr, [0.0] * nr
    busy, live, peak, live_w, peak_w = [0.0] * nr, [0] * nr, [0] * nr, [0] * nr, [0] * nr
    times = [[(0.0, 0.0)] * len(ops) for ops in s.ops]

    def arrival(r: int, mb: int, stage: int, grad: bool) -> float | None:
        src = s.rank_of(mb, stage)
        if src == r:
            return (done_b if grad else done_f).get((mb, stage))
        pair, pos = posted[r][(mb, stage, grad)]
        sent = sends.get(pair, [])
        if len(sent) <= pos:
            return None
        assert sent[pos][0] == (mb, stage, grad), f"message mismatch on pair {pair}"
        return sent[pos][1] + costs.latency

    remaining = sum(len(o) for o in s.ops)
    while remaining:
        progress = False
        for r in range(nr):
            while pc[r] < len(s.ops[r]):
                op = s.ops[r][pc[r]]
                need: list[float | None] = []
                if op.kind in (OpKind.F, OpKind.FB) and op.stage > 0:
                    need.append(arrival(r, op.mb, op.stage - 1, False))
                if op.kind in (OpKind.B, OpKind.FB):
                    mb, st = (op.mb2, op.stage2) if op.kind == OpKind.FB else (op.mb, op.stage)
                    if st + 1 < s.num_stages:
                        need.append(arrival(r, mb, st + 1, True))
                if op.kind == OpKind.RECV and blocking_recv:
                    pair = (op.peer, r)
                    sent = sends.get(pair, [])
                    k = n_posts.get(pair, 0)
                    need.append(sent[k][1] + costs.latency if len(sent) > k else None)
                if any(t is None for t in need):
                    break
                start = max([now[r]] + need)  # type: ignore[list-item]
                end = start + _op_cost(op, costs)
                times[r][pc[r]] = (start, end)
                now[r], busy[r] = end, busy[r] + _op_cost(op, costs)
                if op.kind in (OpKind.F, OpKind.FB):
                    done_f[(op.mb, op.stage)] = end
                    live[r], live_w[r] = live[r] + 1, live_w[r] + 1
                    peak[r], peak_w[r] = max(peak[r], live[r]), max(peak_w[r], live_w[r])
                if op.kind in (OpKind.B, OpKind.FB):
                    mb, st = (op.mb2, op.stage2) if op.kind == OpKind.FB else (op.mb, op.stage)
                    done_b[(mb, st)] = end
                    live[r] -= 1
                    live_w[r] -= 0 if op.defer_w else 1
                if op.kind == OpKind.W:
                    live_w[r] -= 1
                if op.kind == OpKind.SEND:
                    sends.setdefault((r, op.peer), []).append(((op.mb, op.stage, op.grad), end))
                if op.kind == OpKind.RECV:
                    pair = (op.peer, r)
                    posted[r][(op.mb, op.stage, op.grad)] = (pair, n_posts.get(pair, 0))
                    n_posts[pair] = n_posts.get(pair, 0) + 1
                pc[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [f"rank {r}: {s.ops[r][pc[r]]}" for r in range(nr) if pc[r] < len(s.ops[r])]
            raise RuntimeError(f"pipeline schedule invalid: deadlock, waiting at {stuck}")
    makespan = max(now)
    return SimResult(
        makespan=makespan,
        busy=busy,
        finish=now,
        bubble=[makespan - b for b in busy],
        peak_activations=peak,
        peak_activations_w=peak_w,
        times=torch.tensor([t for rank_times in times for t in rank_times], dtype=torch.float64).reshape(-1, 2),
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
