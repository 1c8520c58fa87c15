"""Best-fit packing planner: sequences -> fixed-length chunks -> an equal number of chunks per rank.

The R1 training module sorts sequences by length, packs them best-fit into fixed-length chunks and gives
every data-parallel process the same number of chunks. `plan` does that with the compiled planner
(`torch.ops.r1engine.packing_plan`, csrc/core/packing.cpp: O(n log n) best-fit decreasing over a bit tree
of free-space buckets, then count adjustment by splitting chunks and balancing of the per-rank load: LPT,
chunk swaps, levelling by whole sequences moved from ranks above the mean load to ranks below it, and
single-sequence moves/swaps). The load is `cost` summed per rank (`PackingPlan.rank_load`; `load_ratio` is
its max / min). `backend="python"` runs a pure-Python version of the packing steps with LPT and the
levelling but without the swap refinements; `best_fit_decreasing_reference` is the plain best-fit decreasing
used as the test oracle and as a benchmark baseline.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from r1engine import _ext
from r1engine.ops.backends import registry

PACKING_PLAN = registry.register(
    "packing_plan",
    [
        registry.Backend(
            "cpp", "compiled planner torch.ops.r1engine.packing_plan", check=registry.compiled_op("packing_plan")
        ),
        registry.Backend("python", "pure-Python reference (LPT and levelling, no swaps; slow)"),
    ],
)

CostKind = Literal["tokens", "attention"]

#: Default `a` of the attention-aware cost a*len + len^2. The FLOPs proxy 12*h^2*s + 2*h*s^2 divided by 2h gives
#: a = 6*h; verl's 24576 is h = 4096 (7B). Pass 6 * hidden_size for your model.
DEFAULT_ATTN_COEF = 24576.0


@dataclass(frozen=True)
class PackedChunk:
    """One chunk: the sequences it holds (global indices) and their token offsets inside the chunk."""

    seq_indices: list[int]
    offsets: list[int]
    lengths: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class PackingPlan:
    """Result of `plan`, stored flat (CSR) so that a million sequences cost no Python objects.

    Chunks are numbered rank-major: rank r owns chunks ``rank_ptr[r]:rank_ptr[r+1]`` (the same count for
    every rank), chunk c holds the sequences ``seq_index[chunk_ptr[c]:chunk_ptr[c+1]]`` at token offsets
    ``seq_offset[...]`` (contiguous from 0, longest first). Within a rank, chunks are ordered by load,
    heaviest first.
    """

    lengths: torch.Tensor  # int64 [n]
    chunk_len: int
    num_ranks: int
    cost: str
    attn_coef: float
    min_chunks_per_rank: int
    chunk_multiple: int
    seq_index: torch.Tensor  # int64 [n]
    seq_offset: torch.Tensor  # int64 [n]
    chunk_ptr: torch.Tensor  # int64 [num_chunks + 1]
    rank_ptr: torch.Tensor  # int64 [num_ranks + 1]
    chunk_tokens: torch.Tensor  # int64 [num_chunks]
    chunk_cost: torch.Tensor  # float64 [num_chunks]
    rank_load: torch.Tensor  # float64 [num_ranks]
    total_tokens: int
    lower_bound: int  # ceil(total_tokens / chunk_len)
    bfd_chunks: int  # chunks found by best-fit decreasing, before equalising the count per rank

    # ---- statistics ---------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_tokens.numel())

    @property
    def chunks_per_rank(self) -> int:
        return self.num_chunks // self.num_ranks

    @property
    def lower_bound_per_rank(self) -> int:
        """Fewest chunks per rank any plan can have: ceil(lower_bound / num_ranks), raised to
        min_chunks_per_rank and rounded up to a multiple of chunk_multiple."""
        k = max(-(-self.lower_bound // self.num_ranks), self.min_chunks_per_rank)
        return -(-k // self.chunk_multiple) * self.chunk_multiple

    @property
    def padding_fraction(self) -> float:
        """Share of the chunk slots (num_chunks * chunk_len) that hold padding."""
        slots = self.num_chunks * self.chunk_len
        return 1.0 - self.total_tokens / slots if slots else 0.0

    @property
    def rank_tokens(self) -> torch.Tensor:
        """Tokens per rank, int64 [num_ranks]."""
        if not self.num_chunks:
            return torch.zeros(self.num_ranks, dtype=torch.int64)
        return self.chunk_tokens.view(self.num_ranks, -1).sum(-1)

    @property
    def load_max(self) -> float:
        return float(self.rank_load.max())

    @property
    def load_min(self) -> float:
        return float(self.rank_load.min())

    @property
    def load_ratio(self) -> float:
        """max / min per-rank load (inf when a rank has no load but another has)."""
        lo, hi = self.load_min, self.load_max
        if lo <= 0:
            return 1.0 if hi <= 0 else math.inf
        return hi / lo

    def stats(self) -> dict[str, float]:
        """The plan's statistics as a flat dict (for logging)."""
        return {
            "num_sequences": self.num_sequences,
            "num_chunks": self.num_chunks,
            "chunks_per_rank": self.chunks_per_rank,
            "lower_bound": self.lower_bound,
            "lower_bound_per_rank": self.lower_bound_per_rank,
            "bfd_chunks": self.bfd_chunks,
            "chunks_over_lower_bound": self.num_chunks / max(self.lower_bound, 1),
            "padding_fraction": self.padding_fraction,
            "load_max": self.load_max,
            "load_min": self.load_min,
            "load_ratio": self.load_ratio,
        }

    # ---- structure ----------------------------------------------------------------------------------------
    def chunk_range(self, rank: int) -> range:
        """Global chunk ids owned by `rank`."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in [0, {self.num_ranks}), got {rank}")
        return range(int(self.rank_ptr[rank]), int(self.rank_ptr[rank + 1]))

    def chunk(self, c: int) -> PackedChunk:
        """Chunk `c` (global id) as Python lists."""
        a, b = int(self.chunk_ptr[c]), int(self.chunk_ptr[c + 1])
        idx = self.seq_index[a:b]
        return PackedChunk(idx.tolist(), self.seq_offset[a:b].tolist(), self.lengths[idx].tolist())

    def rank_chunks(self, rank: int) -> list[PackedChunk]:
        """The ordered chunks of `rank`."""
        return [self.chunk(c) for c in self.chunk_range(rank)]

    def placement(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence (in input order): its rank, its global chunk id and its token offset (int64 [n] each)."""
        n = self.num_sequences
        counts = self.chunk_ptr.diff()
        chunk_of_slot = torch.repeat_interleave(torch.arange(self.num_chunks, dtype=torch.int64), counts)
        chunk = torch.empty(n, dtype=torch.int64)
        offset = torch.empty(n, dtype=torch.int64)
        chunk[self.seq_index] = chunk_of_slot
        offset[self.seq_index] = self.seq_offset
        k = max(self.chunks_per_rank, 1)
        return chunk // k, chunk, offset


def _as_lengths(lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"lengths must be an integer tensor (int64 preferred), got dtype {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-D [num_sequences], got shape {tuple(lengths.shape)}")
        return lengths.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if type(lengths).__module__ == "numpy" and hasattr(lengths, "dtype"):  # an array: checked as a whole
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths must be an integer array, got dtype {lengths.dtype}")
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D [num_sequences], got shape {tuple(lengths.shape)}")
        return torch.from_numpy(lengths.astype("int64")).contiguous()
    values = list(lengths)
    for i, v in enumerate(values):
        values[i] = _as_int(v, f"lengths[{i}]")
    return torch.tensor(values, dtype=torch.int64).reshape(-1)


def _as_int(value: Any, name: str) -> int:
    """`value` as a Python int: ints and integer scalars of numpy or torch (anything with `__index__`), not bools."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_lengths(lens: torch.Tensor, chunk_len: int) -> None:
    if not lens.numel():
        return
    lo, hi = torch.aminmax(lens)
    if int(lo) <= 0 or int(hi) > chunk_len:
        i = int(((lens <= 0) | (lens > chunk_len)).nonzero()[0, 0])
        n = int(lens[i])
        what = "every length must be > 0, but" if n <= 0 else f"sequence longer than chunk_len = {chunk_len}:"
        raise ValueError(f"{what} lengths[{i}] = {n}")


def _check_int(name: str, value: int, minimum: int) -> int:
    value = _as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def plan(
    lengths: torch.Tensor | Sequence[int],
    chunk_len: int,
    num_ranks: int = 1,
    *,
    cost: CostKind = "tokens",
    attn_coef: float = DEFAULT_ATTN_COEF,
    min_chunks_per_rank: int = 1,
    chunk_multiple: int = 1,
    backend: Literal["auto", "cpp", "python"] = "auto",
) -> PackingPlan:
    """Pack sequences of the given lengths into chunks of `chunk_len` tokens, the same number per rank.

    Args:
        lengths: int tensor [n] (or list of ints) of sequence lengths, each in [1, chunk_len].
        chunk_len: tokens per chunk (the packed row length L).
        num_ranks: data-parallel ranks; every rank gets the same number of chunks.
        cost: per-rank load to balance: "tokens" (sum of lengths) or "attention" (sum of a*len + len^2).
        attn_coef: `a` of the attention cost (ignored for "tokens").
        min_chunks_per_rank: at least this many chunks per rank (a pipeline wants >= 2*PP micro-batches).
        chunk_multiple: chunks per rank are a multiple of this (e.g. 2 for DualPipe).
        backend: "cpp" (compiled planner), "python" (pure-Python reference, slow: LPT and levelling, no swaps), or
            "auto" (cpp when the extension is built; `PACKING_PLAN` in r1engine.ops.backends.registry).

    Extra chunks (beyond best-fit's count) are made by splitting multi-sequence chunks, so a chunk is empty
    only when there are fewer sequences than chunks required. Deterministic for the same input.
    """
    lens = _as_lengths(lengths)
    chunk_len = _check_int("chunk_len", chunk_len, 1)
    num_ranks = _check_int("num_ranks", num_ranks, 1)
    min_chunks_per_rank = _check_int("min_chunks_per_rank", min_chunks_per_rank, 0)
    chunk_multiple = _check_int("chunk_multiple", chunk_multiple, 1)
    if cost not in ("tokens", "attention"):
        raise ValueError(f"cost must be 'tokens' or 'attention', got {cost!r}")
    attn_coef = float(attn_coef)
    if not (math.isfinite(attn_coef) and attn_coef >= 0):
        raise ValueError(f"attn_coef must be a finite value >= 0, got {attn_coef}")
    backend = PACKING_PLAN.resolve(backend)
    if backend != "cpp":  # the compiled op checks lengths itself (same message), in the same pass as its sort
        _check_lengths(lens, chunk_len)
    if backend == "cpp":
        _ext.require("packing_plan")
        out = torch.ops.r1engine.packing_plan(
            lens, chunk_len, num_ranks, cost, attn_coef, min_chunks_per_rank, chunk_multiple
        )
        seq_index, seq_offset, chunk_ptr, rank_ptr, chunk_tokens, chunk_cost, rank_load, stats = out
        total, lb, bfd = (int(x) for x in stats.tolist())
    else:
        seq_index, seq_offset, chunk_ptr, rank_ptr, chunk_tokens, chunk_cost, rank_load, bfd = _plan_python(
            lens.tolist(), chunk_len, num_ranks, cost, attn_coef, min_chunks_per_rank, chunk_multiple
        )
        total = int(lens.sum())
        lb = -(-total // chunk_len)
    return PackingPlan(
        lengths=lens,
        chunk_len=chunk_len,
        num_ranks=num_ranks,
        cost=cost,
        attn_coef=attn_coef,
        min_chunks_per_rank=min_chunks_per_rank,
        chunk_multiple=chunk_multiple,
        seq_index=seq_index,
        seq_offset=seq_offset,
        chunk_ptr=chunk_ptr,
        rank_ptr=rank_ptr,
        chunk_tokens=chunk_tokens,
        chunk_cost=chunk_cost,
        rank_load=rank_load,
        total_tokens=total,
        lower_bound=lb,
        bfd_chunks=bfd,
    )


# ---- pure-Python reference -----------------------------------------------------------------------------------
def best_fit_decreasing_reference(lengths: Sequence[int], chunk_len: int) -> list[list[int]]:
    """Plain best-fit decreasing: longest first, each into the open chunk with the least free space that fits
    (a sorted list of (free, chunk) searched with bisect). Returns the sequence indices of each chunk."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, chunk id)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            c = len(chunks)
            chunks.append([])
            rest = chunk_len - n
        else:
            rest, c = free.pop(j)
            rest -= n
        chunks[c].append(i)
        if rest > 0:
            bisect.insort(free, (rest, c))
    return chunks


def _level_sequences(
    chunks: list[list[int]],
    rank_chunks: list[list[int]],
    load: list[float],
    lengths: list[int],
    chunk_len: int,
    seq_cost: Callable[[int], float],
    tol: float,
) -> set[int]:
    """Levelling by whole sequences, as level_sequences in csrc/core/packing.cpp (same selection and tie rules).

    Used when the max - min load spread exceeds `tol` of the maximum. Every rank above the mean load gives up
    sequences whose cost stays within its remaining excess, most expensive first (greedy subset sum), never
    emptying a chunk. The pool is dealt most expensive first to the rank with the largest remaining deficit
    (ties: lowest rank), into that rank's chunk with the most free space (ties: lowest chunk id). A sequence is
    placed only while the deficit is at least half its cost, and at most 4 light ranks are tried per sequence;
    a sequence that none of them has room for stays where it was. Updates `chunks` and `load` in place and
    returns the ids of the changed chunks.
    """
    num_ranks = len(load)
    if num_ranks < 2 or not max(load) - min(load) > tol * max(load):
        return set()
    mean = sum(load) / num_ranks
    pool: list[tuple[int, int, int, int]] = []  # (length, chunk, sequence, rank)
    keep: dict[int, int] = {}  # sequences left in each chunk of a rank above the mean
    for r in range(num_ranks):
        excess = load[r] - mean
        if not excess > 0:
            continue
        for c in rank_chunks[r]:
            keep[c] = len(chunks[c])
        own = sorted((lengths[s], c, p, s) for c in rank_chunks[r] for p, s in enumerate(chunks[c]))
        cheapest = seq_cost(own[0][0]) if own else 0.0
        for n, c, _, s in reversed(own):  # greedy subset sum: most expensive first while under the excess
            if excess < cheapest:
                break
            cs = seq_cost(n)
            if cs > excess or keep[c] < 2:
                continue
            keep[c] -= 1
            excess -= cs
            pool.append((n, c, s, r))
    if not pool:
        return set()
    pool.sort(key=lambda e: -e[0])
    need = [(load[r] - mean, r) for r in range(num_ranks) if mean - load[r] > 0]  # (-deficit, rank)
    heapq.heapify(need)
    room: dict[int, list[tuple[int, int]]] = {}  # rank -> heap of (-free space, chunk)
    for _, r in need:
        tokens = {c: sum(lengths[s] for s in chunks[c]) for c in rank_chunks[r]}
        room[r] = [(t - chunk_len, c) for c, t in tokens.items() if t < chunk_len]
        heapq.heapify(room[r])
    moved: set[int] = set()
    sources: set[int] = set()
    targets: set[int] = set()
    for n, c, s, r in pool:
        cs = seq_cost(n)
        tried: list[tuple[float, int]] = []
        dst = None
        while len(tried) < 4 and need and -need[0][0] >= cs / 2:
            neg_deficit, q = heapq.heappop(need)
            tried.append((neg_deficit, q))
            h = room[q]
            if not h or -h[0][0] < n:
                continue
            neg_free, d = heapq.heappop(h)
            if -neg_free > n:
                heapq.heappush(h, (neg_free + n, d))
            tried[-1] = (neg_deficit + cs, q)
            dst = (d, q)
            break
        for t in tried:
            heapq.heappush(need, t)
        if dst is None:
            continue
        chunks[dst[0]].append(s)
        load[dst[1]] += cs
        load[r] -= cs
        moved.add(s)
        sources.add(c)
        targets.add(dst[0])
    for c in sources:  # a rank above the mean only gives, one below only takes: no chunk is in both sets
        chunks[c] = [s for s in chunks[c] if s not in moved]
    return sources | targets


def _plan_python(
    lengths: list[int],
    chunk_len: int,
    num_ranks: int,
    cost: str,
    a: float,
    min_chunks_per_rank: int,
    chunk_multiple: int,
) -> tuple:
    def seq_cost(n: int) -> float:
        return float(n) if cost == "tokens" else a * n + float(n) * n

    chunks = best_fit_decreasing_reference(lengths, chunk_len)
    bfd = len(chunks)
    k = max(-(-bfd // num_ranks), min_chunks_per_rank)
    k = -(-k // chunk_multiple) * chunk_multiple
    costs = [sum(seq_cost(lengths[s]) for s in ch) for ch in chunks]
    # split the most expensive multi-sequence chunk until the count is reached
    heap = [(-costs[c], c) for c in range(len(chunks)) if len(chunks[c]) >= 2]
    heapq.heapify(heap)
    while len(chunks) < k * num_ranks:
        if not heap:
            chunks.append([])
            costs.append(0.0)
            continue
        _, c = heapq.heappop(heap)
        halves: list[list[int]] = [[], []]
        hc = [0.0, 0.0]
        for s in chunks[c]:
            h = 0 if hc[0] <= hc[1] else 1
            halves[h].append(s)
            hc[h] += seq_cost(lengths[s])
        d = len(chunks)
        chunks[c], costs[c] = halves[0], hc[0]
        chunks.append(halves[1])
        costs.append(hc[1])
        for x in (c, d):
            if len(chunks[x]) >= 2:
                heapq.heappush(heap, (-costs[x], x))
    # cardinality-constrained LPT
    ids = sorted(range(len(chunks)), key=lambda c: -costs[c])
    rank_chunks: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0.0] * num_ranks
    rheap = [(0.0, r) for r in range(num_ranks)]
    for c in ids:
        ld, r = heapq.heappop(rheap)
        rank_chunks[r].append(c)
        load[r] = ld + costs[c]
        if len(rank_chunks[r]) < k:
            heapq.heappush(rheap, (load[r], r))
    for c in _level_sequences(chunks, rank_chunks, load, lengths, chunk_len, seq_cost, 1e-3):
        costs[c] = sum(seq_cost(lengths[s]) for s in chunks[c])
    seq_index, seq_offset, chunk_ptr, rank_ptr, chunk_tokens, chunk_cost = [], [], [0], [0], [], []
    for r in range(num_ranks):
        for c in sorted(rank_chunks[r], key=lambda c: (-costs[c], c)):
            off = 0
            for s in sorted(chunks[c], key=lambda s: (-lengths[s], s)):
                seq_index.append(s)
                seq_offset.append(off)
                off += lengths[s]
            chunk_ptr.append(len(seq_index))
            chunk_tokens.append(off)
            chunk_cost.append(costs[c])
        rank_ptr.append(len(chunk_tokens))

    def i64(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64)

    chunk_cost_t = torch.tensor(chunk_cost, dtype=torch.float64)
    rank_load = chunk_cost_t.view(num_ranks, -1).sum(-1) if chunk_cost else torch.zeros(num_ranks, dtype=torch.float64)
    return (
        i64(seq_index),
        i64(seq_offset),
        i64(chunk_ptr),
        i64(rank_ptr),
        i64(chunk_tokens),
        chunk_cost_t,
        rank_load,
        bfd,
    )
