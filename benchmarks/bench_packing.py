"""Benchmark of the packing planner (r1engine.packing.plan) against the packers RL trainers use.

For each length distribution (long-tailed lognormal completions capped at chunk_len, bimodal, uniform, and
"short": many tiny sequences of 1 to 7 tokens, so a few chunks per rank each hold thousands of sequences) and
each size (10k, 100k, 1M sequences), all in one run, it measures:

  ours      r1engine.packing.plan (compiled best-fit decreasing + equal chunk count per rank + LPT/swap/levelling)
  pad       (a) every sequence padded to the longest, sequences split evenly across ranks in arrival order
  verl-KK   (b) verl's scheme, written from its description: Karmarkar-Karp (largest differencing) over the DP
            ranks with equal sizes, then per rank KK into ceil(tokens / chunk_len) micro-batches (max over
            ranks), adding one micro-batch until no micro-batch exceeds chunk_len (verl PR #7553)
  ff        (c) first-fit in arrival order as OpenRLHF counts micro-batches; chunks dealt round-robin to ranks
  py-bfd    (d) straightforward pure-Python best-fit decreasing (bisect over a sorted free-space list); chunks
            dealt round-robin to ranks

and prints: chunks / lower bound ceil(sum(len) / chunk_len), padding fraction, per-rank token load max/min,
planning time (wall and process CPU) and our speed-up. Baselines whose pure-Python cost explodes (verl-KK above
--kk-max or outside --kk-dists, first-fit above --ff-max) are skipped and shown as "-" (not extrapolated).

    python benchmarks/bench_packing.py                 # default: ~3 min on 2 idle cores
    python benchmarks/bench_packing.py --sizes 10000   # quick
    python benchmarks/bench_packing.py --dists short --sizes 50000 --chunk-len 8192 --no-attention
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import cpu_name, git_commit  # noqa: E402
from r1engine.packing import best_fit_decreasing_reference, plan  # noqa: E402


# ---- length distributions ------------------------------------------------------------------------------------
def lengths_for(dist: str, n: int, cap: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "lognormal":  # long-tailed completions (median ~900 tokens) plus a ~200-token prompt, capped
        x = torch.exp(torch.randn(n, generator=g) * 1.0 + 6.8) + 150 + 100 * torch.rand(n, generator=g)
    elif dist == "bimodal":  # 70% short answers, 30% long reasoning traces near the cap
        short = 600 + 200 * torch.randn(n, generator=g)
        long = 0.75 * cap + 0.12 * cap * torch.randn(n, generator=g)
        x = torch.where(torch.rand(n, generator=g) < 0.7, short, long)
    elif dist == "uniform":
        x = torch.rand(n, generator=g) * cap + 1
    elif dist == "short":  # 1 to 7 tokens whatever chunk_len is: the rank loads are sums of a few full chunks
        x = torch.randint(1, 8, (n,), generator=g)
    else:
        raise ValueError(dist)
    return x.long().clamp(1, cap)


def tight_lower_bound(lengths: list[int], cap: int) -> int:
    """A valid lower bound at least ceil(sum / cap): each item longer than cap/2 needs its own chunk, and the
    shorter items that do not fit into those chunks' free space need ceil(rest / cap) more."""
    big = [x for x in lengths if 2 * x > cap]
    small = sum(lengths) - sum(big)
    free_in_big = len(big) * cap - sum(big)
    return max(-(-sum(lengths) // cap), len(big) + max(0, -(-(small - free_in_big) // cap)))


# ---- baselines -----------------------------------------------------------------------------------------------
@dataclass
class Result:
    chunks: int
    padding: float
    load_ratio: float
    seconds: float  # wall clock
    cpu: float = math.nan  # process CPU time (robust when the machine is shared)


def _ratio(loads: list[float]) -> float:
    lo, hi = min(loads), max(loads)
    return hi / lo if lo > 0 else math.inf


def _round_robin_loads(chunk_tokens: list[int], num_ranks: int) -> tuple[int, list[float]]:
    """Deal chunks round-robin (largest first) to ranks, padding the count to a multiple of num_ranks."""
    count = -(-len(chunk_tokens) // num_ranks) * num_ranks
    loads = [0.0] * num_ranks
    for i, t in enumerate(sorted(chunk_tokens, reverse=True)):
        loads[i % num_ranks] += t
    return count, loads


def pad_to_longest(lengths: list[int], cap: int, num_ranks: int) -> Result:
    t0, c0 = time.perf_counter(), time.process_time()
    longest = max(lengths)
    n = len(lengths)
    per = -(-n // num_ranks)
    loads = [float(sum(lengths[r * per : (r + 1) * per])) for r in range(num_ranks)]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    slots = n * longest
    return Result(math.ceil(slots / cap), 1 - sum(lengths) / slots, _ratio(loads), dt, dc)


def karmarkar_karp(values: list[float], k: int, equal_size: bool) -> list[list[int]]:
    """Largest differencing method for k-way partitioning (Karmarkar & Karp 1982; the k-way form verl uses).

    A state is k partitions sorted by sum (descending); the two states with the largest spread are merged by
    pairing the heaviest partition of one with the lightest of the other. Items are kept as nested pairs and
    flattened at the end so that merges do not copy item lists."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    heap: list = []
    counter = 0

    def push(parts: list[tuple[float, object]]) -> None:
        nonlocal counter
        parts.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(parts[0][0] - parts[-1][0]), counter, parts))
        counter += 1

    if equal_size:
        if len(order) % k:
            raise ValueError("equal_size needs len(values) % k == 0")
        for j in range(0, len(order), k):
            push([(values[i], i) for i in order[j : j + k]])
    else:
        for i in order:
            push([(values[i], i)] + [(0.0, None)] * (k - 1))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        push([(a[i][0] + b[k - 1 - i][0], (a[i][1], b[k - 1 - i][1])) for i in range(k)])
    parts = heap[0][2] if heap else [(0.0, None)] * k

    def flatten(node, out: list[int]) -> None:
        stack = [node]
        while stack:
            x = stack.pop()
            if x is None:
                continue
            if isinstance(x, tuple):
                stack.extend(x)
            else:
                out.append(x)

    result = []
    for _, node in parts:
        items: list[int] = []
        flatten(node, items)
        result.append(sorted(items))
    return result


def verl_kk(lengths: list[int], cap: int, num_ranks: int) -> Result:
    t0, c0 = time.perf_counter(), time.process_time()
    n = len(lengths)
    usable = n - n % num_ranks  # equal_size KK needs n % k == 0 (verl asserts it); the remainder goes to rank 0
    ranks = karmarkar_karp([float(x) for x in lengths[:usable]], num_ranks, equal_size=True)
    ranks[0] += list(range(usable, n))
    rank_tokens = [sum(lengths[i] for i in r) for r in ranks]
    count = max(1, max(-(-t // cap) for t in rank_tokens))  # same_micro_num_in_dp: max over ranks

    def fits(c: int) -> bool:  # every micro-batch of every rank within the cap after KK into c parts
        for r in ranks:
            parts = karmarkar_karp([float(lengths[i]) for i in r], c, equal_size=False)
            if any(sum(lengths[r[j]] for j in p) > cap for p in parts):
                return False
        return True

    # PR #7553 adds one micro-batch at a time until every one fits the cap; the same smallest count is found
    # here by doubling then bisection (fewer KK runs; assumes feasibility is monotone in the count).
    if not fits(count):
        step, lo = 1, count
        while not fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        count = hi
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    chunks = count * num_ranks
    return Result(chunks, 1 - sum(lengths) / (chunks * cap), _ratio([float(t) for t in rank_tokens]), dt, dc)


class _MaxTree:
    """Segment tree of max free space over bins (index = bin id), for first-fit in O(log n)."""

    def __init__(self, size: int) -> None:
        self.n = 1 << max(1, (size - 1).bit_length())
        self.t = [0] * (2 * self.n)

    def set(self, i: int, v: int) -> None:
        i += self.n
        self.t[i] = v
        i >>= 1
        while i:
            self.t[i] = max(self.t[2 * i], self.t[2 * i + 1])
            i >>= 1

    def first_at_least(self, v: int) -> int:
        if self.t[1] < v:
            return -1
        i = 1
        while i < self.n:
            i = 2 * i if self.t[2 * i] >= v else 2 * i + 1
        return i - self.n


def first_fit_arrival(lengths: list[int], cap: int, num_ranks: int) -> Result:
    """First-fit in arrival order (OpenRLHF's get_minimum_num_micro_batch_size), same bins, found in O(log n)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tree = _MaxTree(len(lengths))
    fill: list[int] = []
    for x in lengths:
        b = tree.first_at_least(x)
        if b < 0:
            b = len(fill)
            fill.append(0)
        fill[b] += x
        tree.set(b, cap - fill[b])
    count, loads = _round_robin_loads(fill, num_ranks)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return Result(count, 1 - sum(lengths) / (count * cap), _ratio(loads), dt, dc)


def python_bfd(lengths: list[int], cap: int, num_ranks: int) -> Result:
    t0, c0 = time.perf_counter(), time.process_time()
    chunks = best_fit_decreasing_reference(lengths, cap)
    fill = [sum(lengths[i] for i in c) for c in chunks]
    count, loads = _round_robin_loads(fill, num_ranks)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return Result(count, 1 - sum(lengths) / (count * cap), _ratio(loads), dt, dc)


def ours(lengths_t: torch.Tensor, cap: int, num_ranks: int, cost: str = "tokens", repeats: int = 3) -> tuple:
    best, best_cpu = math.inf, math.inf
    p = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        p = plan(lengths_t, cap, num_ranks, cost=cost, attn_coef=6 * 4096.0)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    assert p is not None
    token_loads = p.rank_tokens.double().tolist()
    return Result(p.num_chunks, p.padding_fraction, _ratio(token_loads), best, best_cpu), p


# ---- packed attention backends (CPU) -------------------------------------------------------------------------
def _timed(fn, reps: int = 2) -> float:
    """Process CPU seconds per call (all threads): steadier than wall time on a shared machine."""
    fn()
    c0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - c0) / reps


def _attention_case(q, k, v, cu: torch.Tensor, with_flex: bool) -> dict[str, float]:
    from r1engine.packing.attention import varlen_attention

    res = {be: _timed(lambda be=be: varlen_attention(q, k, v, cu, 0, backend=be)) for be in ("sdpa_loop", "sdpa_mask")}
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        total = q.shape[0]
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff().long())
        bm = create_block_mask(lambda b, h, i, j: (seg[i] == seg[j]) & (i >= j), None, None, total, total, "cpu")
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        res["flex(eager)"] = _timed(lambda: flex_attention(qt, kt, vt, block_mask=bm, enable_gqa=True), reps=1)
    return res


def bench_attention(with_flex: bool) -> None:
    """Time the CPU backends of varlen_attention on one packed chunk (8 query heads, 2 KV heads, D=64)."""
    print("\n# varlen_attention on CPU, one chunk, Hq=8 Hkv=2 D=64 (forward, CPU ms over all threads; lower is better)")
    g = torch.Generator().manual_seed(0)
    for total, nseq in ((2048, 2), (2048, 8), (2048, 64)):
        cuts = sorted((torch.randperm(total - 1, generator=g)[: nseq - 1] + 1).tolist())
        cu = torch.tensor([0, *cuts, total], dtype=torch.int32)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(total, 8, 64, generator=g).to(dtype)
            k = torch.randn(total, 2, 64, generator=g).to(dtype)
            v = torch.randn(total, 2, 64, generator=g).to(dtype)
            res = _attention_case(q, k, v, cu, with_flex)
            cells = "  ".join(f"{name}={sec * 1e3:.0f}" for name, sec in res.items())
            print(f"total={total} seqs={nseq:<3} {str(dtype):<15} {cells}")


# ---- driver --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dists", nargs="+", default=["lognormal", "bimodal", "uniform", "short"])
    ap.add_argument("--chunk-len", type=int, default=16384)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--kk-max", type=int, default=10_000, help="largest n for the verl-KK baseline")
    ap.add_argument(
        "--kk-dists",
        nargs="+",
        default=["lognormal"],
        help="distributions on which verl-KK runs (bimodal/uniform at 10k take 1-2 min each in pure Python)",
    )
    ap.add_argument("--ff-max", type=int, default=100_000, help="largest n for the first-fit baseline")
    ap.add_argument("--no-attention", action="store_true", help="skip the packed-attention timing")
    ap.add_argument("--attention-only", action="store_true", help="only the packed-attention timing")
    ap.add_argument("--flex", action="store_true", help="also time eager FlexAttention (slow on CPU)")
    ap.add_argument("--bfd-max", type=int, default=1_000_000, help="largest n for the pure-Python BFD baseline")
    args = ap.parse_args()
    cap, R = args.chunk_len, args.ranks
    print(f"# bench_packing  chunk_len={cap} ranks={R}  commit={git_commit()}  {cpu_name()}")
    print(f"# torch threads={torch.get_num_threads()}  load avg={os.getloadavg()[0]:.1f}  cores={os.cpu_count()}")
    cols = f"{'chunks/LB':>10}{'padding':>9}{'load max/min':>13}{'wall s':>9}{'cpu s':>9}{'x wall':>8}{'x cpu':>8}"
    print(f"{'dist':<10}{'n':>9} {'method':<8}{cols}")
    for dist in [] if args.attention_only else args.dists:
        for n in args.sizes:
            lt = lengths_for(dist, n, cap, seed=n)
            ls = lt.tolist()
            lb = -(-sum(ls) // cap)
            mine, p = ours(lt, cap, R)
            rows = [("ours", mine)]
            rows.append(("pad", pad_to_longest(ls, cap, R)))
            rows.append(("verl-KK", verl_kk(ls, cap, R) if n <= args.kk_max and dist in args.kk_dists else None))
            rows.append(("ff", first_fit_arrival(ls, cap, R) if n <= args.ff_max else None))
            rows.append(("py-bfd", python_bfd(ls, cap, R) if n <= args.bfd_max else None))
            for name, r in rows:
                if r is None:
                    print(f"{dist:<10}{n:>9} {name:<8}{'-':>10}{'-':>9}{'-':>13}{'-':>9}{'-':>9}{'-':>8}{'-':>8}")
                    continue
                fast = name not in ("ours", "pad")
                speed = f"{r.seconds / mine.seconds:.1f}" if fast else "-"
                speed_cpu = f"{r.cpu / mine.cpu:.1f}" if fast and mine.cpu > 0 else "-"
                print(
                    f"{dist:<10}{n:>9} {name:<8}{r.chunks / lb:>10.4f}{r.padding:>9.4f}{r.load_ratio:>13.5f}"
                    f"{r.seconds:>9.3f}{r.cpu:>9.3f}{speed:>8}{speed_cpu:>8}"
                )
            att, pa = ours(lt, cap, R, cost="attention", repeats=1)
            print(
                f"{dist:<10}{n:>9} {'ours-att':<8}{att.chunks / lb:>10.4f}{att.padding:>9.4f}"
                f"{pa.load_ratio:>13.5f}{att.seconds:>9.3f}{att.cpu:>9.3f}   (attention cost 6h*len + len^2, h=4096)"
            )
            print(
                f"{'':<10}{'':>9} LB = ceil(sum/chunk_len) = {lb} chunks; LB2 (items > chunk_len/2) = "
                f"{tight_lower_bound(ls, cap)}; ours: bfd {p.bfd_chunks}, total {p.num_chunks} "
                f"(per-rank LB {p.lower_bound_per_rank} x {R})"
            )
            sys.stdout.flush()
    if not args.no_attention:
        bench_attention(args.flex)


if __name__ == "__main__":
    main()
