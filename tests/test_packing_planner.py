"""Property and error tests of the best-fit packing planner (r1engine.packing.plan)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1engine import _ext
from r1engine.packing import best_fit_decreasing_reference, plan

needs_cpp = pytest.mark.skipif(not _ext.has_op("packing_plan"), reason="needs the compiled extension")
BACKENDS = ["cpp", "python"] if _ext.has_op("packing_plan") else ["python"]


def check_plan(p, lengths: list[int], chunk_len: int, num_ranks: int, min_chunks: int, multiple: int) -> None:
    """Every invariant a plan must satisfy."""
    n = len(lengths)
    # every sequence placed exactly once
    assert sorted(p.seq_index.tolist()) == list(range(n))
    # equal chunk counts per rank, honouring min_chunks_per_rank and chunk_multiple
    counts = p.rank_ptr.diff().tolist()
    assert len(counts) == num_ranks and len(set(counts)) == 1
    k = counts[0]
    assert k >= min_chunks and k % multiple == 0
    assert p.num_chunks == k * num_ranks >= p.lower_bound
    assert p.lower_bound == -(-sum(lengths) // chunk_len)
    assert k >= p.lower_bound_per_rank
    # contiguous offsets, no chunk over chunk_len, chunk_tokens consistent
    for c in range(p.num_chunks):
        ch = p.chunk(c)
        off = 0
        for s, o, ln in zip(ch.seq_indices, ch.offsets, ch.lengths, strict=True):
            assert o == off and ln == lengths[s]
            off += ln
        assert off <= chunk_len
        assert off == int(p.chunk_tokens[c])
    # an empty chunk only when there are fewer sequences than chunks
    empties = int((p.chunk_tokens == 0).sum())
    assert empties == max(0, p.num_chunks - n)
    # rank loads are the sums of their chunks' costs
    cost = p.lengths.double() if p.cost == "tokens" else p.attn_coef * p.lengths.double() + p.lengths.double() ** 2
    rank_of, _, _ = p.placement()
    expect = torch.zeros(num_ranks, dtype=torch.float64).index_add_(0, rank_of, cost)
    torch.testing.assert_close(p.rank_load, expect, rtol=1e-9, atol=1e-6)


plan_inputs = st.tuples(
    st.integers(1, 300),  # chunk_len
    st.lists(st.floats(0.0, 1.0), min_size=0, max_size=120),  # lengths as fractions of chunk_len
    st.integers(1, 9),  # num_ranks
    st.integers(0, 4),  # min_chunks_per_rank
    st.integers(1, 3),  # chunk_multiple
    st.sampled_from(["tokens", "attention"]),
)


@settings(max_examples=150, deadline=None)
@given(plan_inputs)
def test_plan_invariants(args) -> None:
    chunk_len, fracs, num_ranks, min_chunks, multiple, cost = args
    lengths = [max(1, min(chunk_len, round(f * f * chunk_len))) for f in fracs]  # skewed towards short
    for backend in BACKENDS:
        p = plan(
            torch.tensor(lengths, dtype=torch.int64),
            chunk_len,
            num_ranks,
            cost=cost,
            attn_coef=17.0,
            min_chunks_per_rank=min_chunks,
            chunk_multiple=multiple,
            backend=backend,
        )
        check_plan(p, lengths, chunk_len, num_ranks, min_chunks, multiple)
        again = plan(
            lengths,
            chunk_len,
            num_ranks,
            cost=cost,
            attn_coef=17.0,
            min_chunks_per_rank=min_chunks,
            chunk_multiple=multiple,
            backend=backend,
        )
        assert torch.equal(again.seq_index, p.seq_index) and torch.equal(again.seq_offset, p.seq_offset)
        assert torch.equal(again.chunk_ptr, p.chunk_ptr) and torch.equal(again.rank_ptr, p.rank_ptr)


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 500), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200))
def test_best_fit_matches_reference(chunk_len: int, fracs: list[float]) -> None:
    """With one rank and no count constraints the compiled planner is exactly best-fit decreasing: the same
    number of chunks and the same multiset of chunk fills as the pure-Python reference."""
    lengths = [max(1, min(chunk_len, round(f * chunk_len))) for f in fracs]
    p = plan(lengths, chunk_len, 1, backend="cpp")
    ref = best_fit_decreasing_reference(lengths, chunk_len)
    assert p.bfd_chunks == len(ref) == p.num_chunks
    assert sorted(p.chunk_tokens.tolist()) == sorted(sum(lengths[s] for s in ch) for ch in ref)


def lognormal_lengths(n: int, cap: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 1.0 + 6.8)
    return x.long().clamp(1, cap)


@needs_cpp
@pytest.mark.parametrize("cost", ["tokens", "attention"])
@pytest.mark.parametrize("num_ranks", [1, 8, 32])
def test_quality_on_long_tailed_lengths(cost: str, num_ranks: int) -> None:
    """Goals of the issue on a long-tailed RL-like mix: <= 1.01x the (per-rank) lower bound, load ratio <= 1.02."""
    lengths = lognormal_lengths(20000, 16384, seed=num_ranks)
    p = plan(lengths, 16384, num_ranks, cost=cost, attn_coef=6 * 1024)
    check_plan(p, lengths.tolist(), 16384, num_ranks, 1, 1)
    assert p.bfd_chunks <= 1.01 * p.lower_bound
    assert p.num_chunks <= max(1.01 * p.lower_bound, p.lower_bound_per_rank * num_ranks)
    assert p.load_ratio <= 1.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cost", ["tokens", "attention"])
@pytest.mark.parametrize(
    ("n", "longest", "chunk_len", "num_ranks", "seeds"),
    [(50_000, 7, 8192, 8, (0, 1, 2)), (20_000, 3, 8192, 4, (0, 1)), (10_000, 30, 8192, 16, (0, 1))],
    ids=["50k_1-7tok_8ranks", "20k_1-3tok_4ranks", "10k_1-30tok_16ranks"],
)
def test_balance_with_many_short_sequences(
    n: int, longest: int, chunk_len: int, num_ranks: int, seeds: tuple[int, ...], cost: str, backend: str
) -> None:
    """Sequences far shorter than a chunk: a few chunks per rank, each holding thousands of sequences, so that
    chunk-level balancing alone leaves the rank loads quantised in steps of about half a chunk. Whole
    sequences must then move between ranks: load ratio <= 1.02, every sequence placed once within chunk_len."""
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, longest + 1, (n,), generator=g)
        p = plan(lengths, chunk_len, num_ranks, cost=cost, attn_coef=6 * 1024, backend=backend)
        check_plan(p, lengths.tolist(), chunk_len, num_ranks, 1, 1)
        assert p.load_ratio <= 1.02, (seed, p.rank_load.tolist())


@needs_cpp
def test_min_chunks_split_instead_of_empty() -> None:
    """Raising the count (pipeline needs >= 2*PP micro-batches) splits chunks rather than adding empty ones."""
    lengths = [100] * 40  # 4 full chunks of 1000
    p = plan(lengths, 1000, 2, min_chunks_per_rank=6, chunk_multiple=4)
    assert p.chunks_per_rank == 8
    assert int((p.chunk_tokens == 0).sum()) == 0
    assert p.load_ratio == 1.0


def test_stats_fields() -> None:
    p = plan([5, 6, 7, 3], 10, 2)
    s = p.stats()
    assert s["num_chunks"] == p.num_chunks and s["lower_bound"] == 3
    assert 0.0 <= s["padding_fraction"] < 1.0
    assert abs(s["padding_fraction"] - (1 - 21 / (p.num_chunks * 10))) < 1e-12
    assert s["load_ratio"] == p.load_max / p.load_min
    assert [c.tokens for r in range(2) for c in p.rank_chunks(r)] == p.chunk_tokens.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend: str) -> None:
    with pytest.raises(ValueError, match=r"lengths\[2\] = 11"):
        plan([3, 4, 11, 12], 10, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        plan([3, 0, 2], 10, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -4"):
        plan(torch.tensor([-4, 2]), 10, backend=backend)
    with pytest.raises(ValueError, match="chunk_len"):
        plan([3], 0, backend=backend)
    with pytest.raises(ValueError, match="num_ranks"):
        plan([3], 10, 0, backend=backend)
    with pytest.raises(ValueError, match="min_chunks_per_rank"):
        plan([3], 10, min_chunks_per_rank=-1, backend=backend)
    with pytest.raises(ValueError, match="chunk_multiple"):
        plan([3], 10, chunk_multiple=0, backend=backend)
    with pytest.raises(ValueError, match="cost"):
        plan([3], 10, cost="flops", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        plan(torch.tensor([3.0, 4.0]), 10, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        plan(torch.tensor([[3, 4]]), 10, backend=backend)
    with pytest.raises(TypeError, match="chunk_len"):
        plan([3], 10.0, backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_lengths_and_integers_are_accepted(backend: str) -> None:
    import numpy as np

    expected = plan([5, 6, 7], 16, 2, backend=backend)
    for lengths in (np.array([5, 6, 7]), np.array([5, 6, 7], dtype=np.int32), [np.int64(5), np.int32(6), 7]):
        got = plan(lengths, np.int64(16), np.int32(2), min_chunks_per_rank=np.int16(1), backend=backend)
        assert got.chunk_len == 16 and type(got.chunk_len) is int
        assert torch.equal(got.seq_index, expected.seq_index) and torch.equal(got.chunk_ptr, expected.chunk_ptr)
    with pytest.raises(TypeError, match="integer array, got dtype float64"):
        plan(np.array([5.0, 6.0]), 16, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        plan(np.array([[5, 6]]), 16, backend=backend)
    with pytest.raises(TypeError, match=r"lengths\[1\] must be an int, got float"):
        plan([5, 6.5], 16, backend=backend)
    with pytest.raises(TypeError, match=r"lengths\[0\] must be an int, got bool"):
        plan([True], 16, backend=backend)


@needs_cpp
def test_op_errors_directly() -> None:
    """The compiled op validates on its own too (for callers that bypass the Python wrapper)."""
    with pytest.raises(ValueError, match=r"lengths\[1\] = 40"):
        torch.ops.r1engine.packing_plan(torch.tensor([6, 40]), 10, 2, "tokens", 0.0, 1, 1)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.r1engine.packing_plan(torch.tensor([6, 4], dtype=torch.int32), 10, 2, "tokens", 0.0, 1, 1)


def test_empty_input() -> None:
    p = plan(torch.zeros(0, dtype=torch.int64), 10, 3)
    assert p.num_chunks == 3 and p.total_tokens == 0 and p.lower_bound == 0


@needs_cpp
def test_huge_chunk_len_uses_tree_path() -> None:
    """chunk_len far above the number of sequences: balanced-tree best fit, same result as the reference."""
    lengths = [3, 2**40, 4, 2**40 + 5, 7, 2**39]
    cap = 2**41
    p = plan(lengths, cap, 2)
    check_plan(p, lengths, cap, 2, 1, 1)
    assert p.bfd_chunks == len(best_fit_decreasing_reference(lengths, cap))
