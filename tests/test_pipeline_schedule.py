"""Tests of the schedule generator and simulator through the Python API (fast, no processes).

The simulator asserts (max over ranks of makespan - busy, B = full backward, latency 0):
  1F1B: (PP-1)(F+B) for any costs; ZB1P: (PP-1)(F+B-2W) when W <= F and W <= B - W;
  DualPipe (PP ranks) and DualPipeV (PP/2 ranks): exactly (PP/2-1)(F&B+B-3W) when F = W and B = 2W (the
  zero-bubble paper's F = B_input = W), for any F&B between B and F+B; peak live chunks PP+1 on every rank
  (1F1B: PP on rank 0).
"""

from __future__ import annotations

import pytest
import torch

from r1engine import _ext
from r1engine.pipeline import Costs, OpKind, build_schedule, published_bubble, simulate, validate_schedule_args
from r1engine.pipeline.schedule import Op, Schedule, decode

pytestmark = pytest.mark.skipif(not _ext.has_op("pipeline_schedule"), reason="compiled extension not built")


@pytest.mark.parametrize("kind,ranks,mbs", [("dualpipe", 4, 10), ("dualpipev", 3, 7), ("1f1b", 3, 5), ("zb1p", 5, 9)])
def test_every_chunk_once_on_its_rank(kind: str, ranks: int, mbs: int) -> None:
    s = build_schedule(kind, ranks, mbs)
    seen_f, seen_b, seen_w, deferred = set(), set(), set(), set()
    for r, ops in enumerate(s.ops):
        for op in ops:
            if op.kind in (OpKind.F, OpKind.FB):
                assert s.rank_of(op.mb, op.stage) == r and s.slot_of(op.mb, op.stage) == op.slot
                assert (op.mb, op.stage) not in seen_f
                seen_f.add((op.mb, op.stage))
            if op.kind in (OpKind.B, OpKind.FB):
                key = (op.mb2, op.stage2) if op.kind == OpKind.FB else (op.mb, op.stage)
                assert key not in seen_b
                seen_b.add(key)
                if op.defer_w:
                    deferred.add(key)
            if op.kind == OpKind.W:
                seen_w.add((op.mb, op.stage))
    everything = {(mb, st) for mb in range(mbs) for st in range(s.num_stages)}
    assert seen_f == everything and seen_b == everything and seen_w == deferred
    assert (len(deferred) > 0) == (kind != "1f1b")


def test_roundtrip_and_placement() -> None:
    s = build_schedule("dualpipe", 4, 8)
    ops, offsets = s.to_tensors()
    assert ops.dtype == torch.int64 and ops.shape[1] == 11 and offsets.tolist()[-1] == ops.shape[0]
    again = decode("dualpipe", 4, 8, True, ops, offsets)
    assert again == s
    assert [s.rank_of(0, st) for st in range(4)] == [0, 1, 2, 3]
    assert [s.rank_of(5, st) for st in range(4)] == [3, 2, 1, 0]
    assert [s.stage_of_slot(1, slot) for slot in (0, 1)] == [1, 2]
    v = build_schedule("dualpipev", 3, 6)
    assert [v.rank_of(0, st) for st in range(6)] == [0, 1, 2, 2, 1, 0]
    assert "F0.0" in v.describe(0)


@pytest.mark.parametrize(
    "kind,ranks,mbs,needle",
    [
        ("dualpipe", 3, 12, "even number of pipeline ranks"),
        ("dualpipe", 4, 6, r"even and >= 2 \* num_ranks = 8, got 6"),
        ("dualpipe", 4, 9, r"even and >= 2 \* num_ranks = 8, got 9"),
        ("dualpipev", 4, 7, r">= 2 \* num_ranks = 8 \(the number of stages\), got 7"),
        ("1f1b", 0, 4, "num_ranks must be >= 1"),
        ("zb1p", 2, 0, "num_microbatches must be >= 1"),
        ("gpipe", 2, 4, "kind must be one of"),
    ],
)
def test_bad_arguments(kind: str, ranks: int, mbs: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        validate_schedule_args(kind, ranks, mbs)
    with pytest.raises(ValueError, match=needle):
        build_schedule(kind, ranks, mbs)
    if kind != "gpipe":  # the compiled op checks too
        with pytest.raises(ValueError, match=needle):
            torch.ops.r1engine.pipeline_schedule(kind, ranks, mbs, True)


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
def test_published_bubbles(pp: int) -> None:
    cost_sets = (Costs(1, 2, 1, 2.5), Costs(0.5, 1.0, 0.5, 1.0), Costs(0.5, 1.0, 0.5, 1.5), Costs(1, 2, 1))
    for mult in (2, 3, 8):
        scheds = {
            "dualpipe": build_schedule("dualpipe", pp, mult * pp),
            "dualpipev": build_schedule("dualpipev", pp // 2, mult * pp // 2 + 1),
            "1f1b": build_schedule("1f1b", pp, mult * pp),
            "zb1p": build_schedule("zb1p", pp, mult * pp),
        }
        for costs in cost_sets:
            for kind, sched in scheds.items():
                res = simulate(sched, costs)
                assert res.max_bubble == pytest.approx(published_bubble(kind, pp, costs), abs=1e-9), (kind, costs)
                if kind.startswith("dualpipe"):
                    assert res.peak_activations == [pp + 1] * sched.num_ranks
                if kind == "1f1b":
                    assert res.peak_activations[0] == pp
    # 1F1B and ZB1P formulas also hold for unequal costs (ZB1P while W <= F and W <= B - W).
    c = Costs(1.3, 2.1, 0.7, 2.9)
    assert simulate(build_schedule("1f1b", pp, 3 * pp), c).max_bubble == pytest.approx(published_bubble("1f1b", pp, c))
    assert simulate(build_schedule("zb1p", pp, 3 * pp), c).max_bubble == pytest.approx(published_bubble("zb1p", pp, c))


def test_ordering_bubble_and_latency() -> None:
    c = Costs(1, 2, 1, 2.5, latency=0.1)
    pp, m = 8, 32
    b1 = simulate(build_schedule("1f1b", pp, m), c)
    bz = simulate(build_schedule("zb1p", pp, m), c)
    bd = simulate(build_schedule("dualpipe", pp, m), c)
    assert bd.bubble_fraction < bz.bubble_fraction < b1.bubble_fraction
    blocking = simulate(build_schedule("dualpipe", pp, m), c, comm="blocking_recv")
    assert blocking.makespan >= bd.makespan
    assert bd.times.shape == (sum(len(o) for o in build_schedule("dualpipe", pp, m).ops), 2)


def test_simulator_rejects_broken_schedule() -> None:
    s = build_schedule("1f1b", 2, 2)
    r0 = list(s.ops[0])
    # Rank 0 waits for the gradient of micro-batch 0 before sending the activation that produces it.
    by = {(op.kind, op.mb): op for op in r0}
    bad0 = [
        by[(OpKind.F, 0)],
        by[(OpKind.F, 1)],
        by[(OpKind.RECV, 0)],
        by[(OpKind.B, 0)],
        by[(OpKind.SEND, 0)],
        by[(OpKind.SEND, 1)],
        by[(OpKind.RECV, 1)],
        by[(OpKind.B, 1)],
    ]
    broken = Schedule(s.kind, 2, 2, 2, s.zero_bubble, (tuple(bad0), s.ops[1]))
    for backend in ("cpp", "python"):
        with pytest.raises(RuntimeError, match="deadlock"):
            simulate(broken, backend=backend)
    # Plain blocking send/recv would deadlock on the emitted schedules (the executor uses isend/irecv).
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(build_schedule("dualpipev", 2, 4), comm="synchronous")
    with pytest.raises(ValueError, match="comm must be one of"):
        simulate(s, comm="eager")
    # A forward on the wrong rank.
    wrong = Schedule(s.kind, 2, 2, 2, s.zero_bubble, ((Op(OpKind.F, 0, 1, 0),) + s.ops[0], s.ops[1]))
    with pytest.raises(RuntimeError, match="belongs to rank"):
        simulate(wrong)


@pytest.mark.parametrize("kind,ranks,mbs", [("dualpipe", 4, 10), ("dualpipev", 3, 7), ("1f1b", 4, 6), ("zb1p", 3, 7)])
def test_compiled_simulator_matches_python_reference(kind: str, ranks: int, mbs: int) -> None:
    gen = torch.Generator().manual_seed(7)
    sched = build_schedule(kind, ranks, mbs)
    for trial in range(4):
        f, w, bi, lat = (0.2 + 2 * torch.rand(4, generator=gen, dtype=torch.float64)).tolist()
        b = w + bi
        costs = Costs(f, b, w, max(f, b) + 0.5 * min(f, b), latency=lat * (trial % 2))
        for comm in ("async", "blocking_recv"):
            fast = simulate(sched, costs, comm)
            ref = simulate(sched, costs, comm, backend="python")
            assert fast.makespan == pytest.approx(ref.makespan, rel=1e-12)
            assert fast.bubble == pytest.approx(ref.bubble, rel=1e-12)
            assert fast.peak_activations == ref.peak_activations
            assert fast.peak_activations_w == ref.peak_activations_w
            torch.testing.assert_close(fast.times, ref.times, rtol=1e-12, atol=1e-12)
