"""CPU packed (varlen) attention: the C++ kernel and the length-bucketed dispatch against the per-sequence loop and
padded SDPA.

Methods, all on the same packed row (sequences packed first-fit into chunks of `chunk_len`, each chunk's unused
tail a padding segment of its own, one flat row with `cu_seqlens` spanning every chunk, as the trainer passes it):

  cpu      varlen_attention(backend="cpu"): the C++ kernels (csrc/core/varlen_attention.*), the CPU default
  bucket   varlen_attention(backend="sdpa_bucket"): length buckets planned by a cost model, the previous default
  loop     varlen_attention(backend="sdpa_loop"): the default before that, one SDPA call per segment
  padded   a padded framework's attention: every real sequence right-padded to the longest, one causal SDPA call
           [num_seqs, H, max_len, D] on tensors already in that layout (TRL's layout; pad rows are wasted work)

Grid: sequence lengths short 16-80 / medium 200-500 / long 2k-4k (uniform) x chunk_len 256 / 1024 / 8192 (those
that hold the sequences) x head_dim 32 / 64 / 128 x fp32 / bf16; 6 query heads, 2 KV heads (GQA); about
`--tokens` tokens per row. Forward (no autograd) and forward + backward are timed, methods interleaved within each
repeat, median over repeats, on 1 thread. Prints times and bucket/cpu, loop/bucket and padded/bucket ratios (> 1:
the second named is faster) and writes benchmarks/results/attention.md.

GRPO section (always run; alone with --grpo): the bench_vs_trl shape, 32 sequences of 50-90 tokens packed first-fit
in 256-token chunks (6 query / 2 KV heads, head_dim 32), "cpu" vs "sdpa_bucket": the op forward (no_grad, as the
reference pass) and forward + backward, and the whole demo PolicyModel (3 layers, vocab 101) forward (no_grad) and
forward + backward of a cross-entropy over the same packed row with either backend, fp32 and bf16.

    nice python benchmarks/bench_attention.py                  # the full grid (~15 min on a shared 2-core box)
    nice python benchmarks/bench_attention.py --quick          # head_dim 32 only, fewer repeats
    nice python benchmarks/bench_attention.py --grpo           # only the GRPO section (~1 min)
    nice python benchmarks/bench_attention.py --calibrate      # fit BucketCostModel constants on this machine
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import git_commit, machine  # noqa: E402
from r1engine import _ext, settings  # noqa: E402
from r1engine.models.config import PolicyConfig  # noqa: E402
from r1engine.models.policy import PolicyModel  # noqa: E402
from r1engine.packing.attention import (  # noqa: E402
    BucketCostModel,
    cost_model_for,
    plan_length_buckets,
    varlen_attention,
)

HAS_KERNEL = _ext.has_op("varlen_attention_fwd")

LENGTH_RANGES = {"short": (16, 80), "medium": (200, 500), "long": (2000, 4000)}
CHUNK_LENS = (256, 1024, 8192)
HEADS_Q, HEADS_KV = 6, 2


def packed_row(lengths: list[int], chunk_len: int) -> tuple[list[int], list[int]]:
    """First-fit packing into chunks; returns (real sequence lengths in row order, all segment lengths incl. pads)."""
    chunks: list[list[int]] = []
    for n in lengths:
        for c in chunks:
            if sum(c) + n <= chunk_len:
                c.append(n)
                break
        else:
            chunks.append([n])
    real, segments = [], []
    for c in chunks:
        real += c
        segments += c + ([chunk_len - sum(c)] if sum(c) < chunk_len else [])
    return real, segments


def make_case(kind: str, chunk_len: int, tokens: int, seed: int) -> tuple[list[int], list[int]]:
    """Sequences drawn until `max(1, tokens // chunk_len)` chunks are full (a draw that would open one more chunk is
    dropped), so no row ends in a nearly empty chunk whose padding segment would dominate the work."""
    lo, hi = LENGTH_RANGES[kind]
    g = torch.Generator().manual_seed(seed)
    num_chunks = max(1, tokens // chunk_len)
    lengths: list[int] = []
    for _ in range(20 * tokens // lo):  # enough draws to fill every chunk up to a few tokens
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        if sum(packed_row([*lengths, n], chunk_len)[1]) <= num_chunks * chunk_len:
            lengths.append(n)
    return packed_row(lengths, chunk_len)


def time_us(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median microseconds per method; methods interleaved within each repeat (ABC CBA: drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            times[name].append(time_us(fns[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_case(segments: list[int], real: list[int], head_dim: int, dtype: torch.dtype, repeats: int) -> dict:
    total = sum(segments)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, HEADS_Q, head_dim, generator=g).to(dtype)
    k = torch.randn(total, HEADS_KV, head_dim, generator=g).to(dtype)
    v = torch.randn(total, HEADS_KV, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    max_len = max(real)
    pq = torch.randn(len(real), HEADS_Q, max_len, head_dim, generator=g).to(dtype)
    pk = torch.randn(len(real), HEADS_KV, max_len, head_dim, generator=g).to(dtype)
    pv = torch.randn(len(real), HEADS_KV, max_len, head_dim, generator=g).to(dtype)

    def packed(backend: str, grad: bool) -> Callable[[], None]:
        def fn() -> None:
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
            with torch.set_grad_enabled(grad):
                out = varlen_attention(qs, ks, vs, cu, max(segments), backend=backend)  # type: ignore[arg-type]
                if grad:
                    out.sum().backward()

        return fn

    def padded(grad: bool) -> Callable[[], None]:
        def fn() -> None:
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (pq, pk, pv))
            with torch.set_grad_enabled(grad):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                if grad:
                    out.sum().backward()

        return fn

    result = {}
    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        fns = {"bucket": packed("sdpa_bucket", grad), "loop": packed("sdpa_loop", grad), "padded": padded(grad)}
        if HAS_KERNEL:
            fns["cpu"] = packed("cpu", grad)
        for fn in fns.values():  # warm-up; also builds and caches the bucket plan, as a forward's first layer does
            fn()
        for name, t in interleaved(fns, repeats).items():
            result[(mode, name)] = t
    with torch.enable_grad():
        model = cost_model_for(q.requires_grad_(), k, v)
    result["buckets"] = len(plan_length_buckets(segments, HEADS_Q, head_dim, True, model))
    return result


# ---- GRPO section: the bench_vs_trl shape, op and whole model -------------------------------------------------

GRPO_SEQS, GRPO_LENGTHS, GRPO_CHUNK = 32, (50, 90), 256


def grpo_row(seed: int = 0) -> tuple[list[int], list[int]]:
    """32 sequences of 50-90 tokens (prompt + completion of the bench_vs_trl rollouts) packed first-fit in 256-token
    chunks; returns (real lengths, all segment lengths incl. each chunk's padding tail)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(GRPO_LENGTHS[0], GRPO_LENGTHS[1] + 1, (GRPO_SEQS,), generator=g).tolist()
    return packed_row(lengths, GRPO_CHUNK)


def grpo_op(segments: list[int], dtype: torch.dtype, repeats: int) -> dict:
    total = sum(segments)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, HEADS_Q, 32, generator=g).to(dtype)
    k = torch.randn(total, HEADS_KV, 32, generator=g).to(dtype)
    v = torch.randn(total, HEADS_KV, 32, generator=g).to(dtype)
    dout = torch.randn(total, HEADS_Q, 32, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)

    def call(backend: str, grad: bool) -> Callable[[], None]:
        def fn() -> None:
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
            with torch.set_grad_enabled(grad):
                out = varlen_attention(qs, ks, vs, cu, max(segments), backend=backend)  # type: ignore[arg-type]
                if grad:
                    out.backward(dout)

        return fn

    return cpu_vs_bucket(call, repeats)


def cpu_vs_bucket(call: Callable[[str, bool], Callable[[], None]], repeats: int) -> dict:
    """Seconds of `call(backend, grad)()` for backends "cpu" and "sdpa_bucket", forward and forward+backward,
    interleaved after one warm-up each: {(mode, backend): seconds}."""
    result = {}
    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        fns = {name: call(name, grad) for name in ("cpu", "sdpa_bucket")}
        for fn in fns.values():
            fn()
        for name, t in interleaved(fns, repeats).items():
            result[(mode, name)] = t
    return result


def grpo_model(segments: list[int], dtype: torch.dtype, repeats: int) -> dict:
    cfg = PolicyConfig.demo(vocab_size=101, num_mtp_layers=0)
    model = PolicyModel(cfg).to(dtype)
    model.reset_parameters(seed=0)
    total = sum(segments)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, total), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (total,), generator=g)
    cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)

    def call(backend: str, grad: bool) -> Callable[[], None]:
        def fn() -> None:
            with settings.override(attention_backend=backend), torch.set_grad_enabled(grad):
                logits = model(ids, cu_seqlens=cu).logits
                if grad:
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(logits[0].float(), targets).backward()

        return fn

    return cpu_vs_bucket(call, repeats)


def grpo_section(repeats: int) -> list[str]:
    real, segments = grpo_row()
    header = (
        "| what | dtype | fwd cpu ms | fwd sdpa_bucket ms | fwd bucket/cpu | f+b cpu ms | f+b sdpa_bucket ms "
        "| f+b bucket/cpu |"
    )
    lines = [
        f"{len(real)} sequences of {min(real)}-{max(real)} tokens ({sum(real)} real tokens) in {len(segments)} "
        f"segments of {GRPO_CHUNK}-token chunks ({sum(segments)} tokens with the padding tails); 6 query / 2 KV "
        f"heads, head_dim 32; median of {repeats} interleaved repeats.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    print("\n".join(lines), flush=True)
    for what, fn in (("varlen_attention op", grpo_op), ("PolicyModel demo, 3 layers", grpo_model)):
        for dtype in (torch.float32, torch.bfloat16):
            r = fn(segments, dtype, repeats)
            row = (
                f"| {what} | {str(dtype)[6:]} | {r[('fwd', 'cpu')] / 1e3:.2f} | {r[('fwd', 'sdpa_bucket')] / 1e3:.2f} "
                f"| {r[('fwd', 'sdpa_bucket')] / r[('fwd', 'cpu')]:.2f} | {r[('fwd+bwd', 'cpu')] / 1e3:.2f} "
                f"| {r[('fwd+bwd', 'sdpa_bucket')] / 1e3:.2f} "
                f"| {r[('fwd+bwd', 'sdpa_bucket')] / r[('fwd+bwd', 'cpu')]:.2f} |"
            )
            print(row, flush=True)
            lines.append(row)
    return lines


def calibrate(repeats: int) -> None:
    """Least-squares fit of BucketCostModel's three constants to timed bucket calls (gathers + SDPA + scatter)."""
    shapes = [(n, p, d) for n in (1, 4, 16) for p in (8, 32, 96, 256) for d in (32, 128)]
    for grad in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            rows, ys = [], []
            for n, p, d in shapes:
                segments = [p] * n
                total = n * p
                q = torch.randn(total, HEADS_Q, d).to(dtype)
                k = torch.randn(total, HEADS_KV, d).to(dtype)
                v = torch.randn(total, HEADS_KV, d).to(dtype)
                cu = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)

                def fn(q=q, k=k, v=v, cu=cu, p=p, grad=grad) -> None:
                    qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
                    with torch.set_grad_enabled(grad):
                        out = varlen_attention(qs, ks, vs, cu, p, backend="sdpa_bucket")
                        if grad:
                            out.sum().backward()

                fn()
                us = statistics.median(time_us(fn) for _ in range(repeats))
                rows.append([1.0, n * p * HEADS_Q * d, n * HEADS_Q * d * p * (p + 1) / 2])
                ys.append(us)
            a = torch.tensor(rows, dtype=torch.float64)
            y = torch.tensor(ys, dtype=torch.float64)
            w = 1.0 / y  # relative error: small calls matter as much as big ones
            coef = torch.linalg.lstsq(a * w[:, None], (y * w)[:, None]).solution.flatten().clamp_min(0).tolist()
            fitted = BucketCostModel(*coef)
            rel = [abs(fitted.cost(n, p, HEADS_Q, d, True) - t) / t for (n, p, d), t in zip(shapes, ys, strict=True)]
            print(
                f"grad={grad!s:5} {str(dtype)[6:]:8} call_us={coef[0]:.1f} row_us={coef[1]:.2e} "
                f"score_us={coef[2]:.2e}  median rel err {statistics.median(rel):.2f}",
                flush=True,
            )


def machine_with_capability() -> str:
    return f"{machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per packed row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--kinds", nargs="+", default=list(LENGTH_RANGES), choices=list(LENGTH_RANGES))
    parser.add_argument("--quick", action="store_true", help="head_dim 32, 3 repeats")
    parser.add_argument("--grpo", action="store_true", help="only the GRPO section (bench_vs_trl shape, op + model)")
    parser.add_argument("--grpo-repeats", type=int, default=15)
    parser.add_argument("--calibrate", action="store_true", help="fit the cost model constants and exit")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.calibrate:
        calibrate(args.repeats)
        return
    if args.quick:
        args.head_dims, args.repeats = [32], 3
    if not HAS_KERNEL:
        raise SystemExit("the compiled extension has no varlen_attention_fwd: build it first (setup.py build_ext)")

    grpo_lines = grpo_section(args.grpo_repeats)
    header = (
        "| lengths | chunk_len | D | dtype | seqs | segs | buckets | fwd cpu ms | fwd bucket ms | fwd bucket/cpu "
        "| fwd loop/bucket | fwd padded/bucket | f+b cpu ms | f+b bucket ms | f+b bucket/cpu | f+b loop/bucket "
        "| f+b padded/bucket |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    if not args.grpo:
        print(header, flush=True)
    for kind in [] if args.grpo else args.kinds:
        for chunk_len in CHUNK_LENS:
            if chunk_len < LENGTH_RANGES[kind][1]:
                continue
            real, segments = make_case(kind, chunk_len, args.tokens, seed=chunk_len)
            for head_dim in args.head_dims:
                for dtype in (torch.float32, torch.bfloat16):
                    repeats = 1 if kind == "long" else args.repeats  # one long fwd+bwd takes seconds
                    r = run_case(segments, real, head_dim, dtype, repeats)
                    cells = [f"{kind} {LENGTH_RANGES[kind][0]}-{LENGTH_RANGES[kind][1]}", chunk_len, head_dim]
                    cells += [str(dtype)[6:], len(real), len(segments), r["buckets"]]
                    for mode in ("fwd", "fwd+bwd"):
                        bucket = r[(mode, "bucket")]
                        cells += [f"{r[(mode, 'cpu')] / 1e3:.2f}", f"{bucket / 1e3:.2f}"]
                        cells += [f"{bucket / r[(mode, name)]:.2f}" for name in ("cpu",)]
                        cells += [f"{r[(mode, name)] / bucket:.2f}" for name in ("loop", "padded")]
                    row = "| " + " | ".join(str(c) for c in cells) + " |"
                    print(row, flush=True)
                    lines.append(row)

    commit = git_commit()
    command = "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:])
    with open(args.out, "w") as f:
        f.write("# CPU packed attention: C++ kernel vs length buckets vs per-sequence loop vs padded SDPA\n\n")
        f.write(f"- Command: `nice {command.strip()}` (1 thread)\n")
        f.write(f"- Date: {datetime.date.today()}; commit {commit}; machine: {machine_with_capability()}\n")
        f.write(f"- Load average at the end: {os.getloadavg()[0]:.1f} (shared box; ratios are interleaved runs)\n\n")
        f.write("## GRPO shape (bench_vs_trl): backend cpu vs sdpa_bucket\n\n")
        f.write("\n".join(grpo_lines) + "\n")
        if not args.grpo:
            f.write("\n## Grid\n\n")
            f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
