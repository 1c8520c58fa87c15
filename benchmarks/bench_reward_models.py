"""Reward-model scoring throughput: packed varlen batches against padded batches, in one run.

The reward model is SmolLM2-135M-Instruct's body with a fresh score head (`models/SmolLM2-135M-Instruct` when
scripts/fetch_smollm2.sh has fetched it, else a random body of the same shape: 30 layers, hidden 576, 9 query / 3 KV
heads, vocabulary 49,152). The sequences stand for the inputs of an RL step's general rewards (prompt + response):
lengths drawn log-normally (median `--median` tokens, spread `--sigma`, clipped to [16, `--max-len`]), random token
ids, the same sequences for every method. Each method scores all of them through
`r1engine.reward_models.score_sequences` with the same token budget per forward:

  packed         best-fit packed rows of at most `--budget` tokens, one varlen forward each (the scorer's default)
  padded         right-padded [B, T] batches in arrival order, B * T <= `--budget` (a padded framework's batching)
  padded_sorted  the same after sorting by length (length-grouped padding, the better padded baseline)

The methods run interleaved, median over `--repeats`; scores of every method are compared with the packed ones.
Prints sequences/s and the ratios packed / padded, packed / padded_sorted, the slots each computes (real tokens
plus padding) and peak RSS; writes benchmarks/results/reward_models.md.

    nice python benchmarks/bench_reward_models.py                 # 32 sequences, about 4 minutes on 2 shared cores
    nice python benchmarks/bench_reward_models.py --quick         # 12 sequences, one repeat
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import git_commit, machine, peak_memory  # noqa: E402
from r1engine.models.config import PolicyConfig  # noqa: E402
from r1engine.reward_models import RewardFormat, RewardModel, score_sequences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
MODES = ("packed", "padded", "padded_sorted")


def load_model(dtype: torch.dtype) -> tuple[RewardModel, str]:
    fmt = RewardFormat(kind="pointwise", input="single")
    if (SMOLLM2 / "config.json").is_file():
        return RewardModel.from_pretrained(SMOLLM2, fmt=fmt, dtype=dtype), "SmolLM2-135M-Instruct (weights)"
    shape = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    cfg = PolicyConfig(
        **shape, intermediate_size=1536, max_position_embeddings=8192, num_mtp_layers=0, tie_word_embeddings=True,
        qkv_bias=False, rope_theta=100000.0, rms_norm_eps=1e-5, architecture="LlamaForCausalLM",
    )  # fmt: skip
    model = RewardModel(cfg, 1, fmt)
    model.body.reset_parameters(0)
    return model.to(dtype), "random body of SmolLM2-135M's shape"


def lengths_of(n: int, median: int, sigma: float, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * sigma) * median
    return raw.round().clamp(16, max_len).long().tolist()


def slots(lengths: list[int], mode: str, budget: int) -> int:
    """Token slots a method computes (real tokens plus padding)."""
    if mode == "packed":
        return sum(lengths)
    order = sorted(lengths, reverse=True) if mode == "padded_sorted" else lengths
    total, batch = 0, []
    for n in order:
        if batch and (len(batch) + 1) * max(batch + [n]) > budget:
            total += len(batch) * max(batch)
            batch = []
        batch.append(n)
    return total + (len(batch) * max(batch) if batch else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--median", type=int, default=160)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=4096, help="tokens per forward (every method)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quick", action="store_true", help="12 sequences, one repeat")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_models.md"))
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.repeats = 12, 1
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, source = load_model(dtype)
    model.eval()
    lengths = lengths_of(args.seqs, args.median, args.sigma, args.max_len, seed=1)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    spread = f"{min(lengths)}-{max(lengths)} (median {int(statistics.median(lengths))})"
    print(f"{source}, {args.dtype}, {args.threads} threads: {len(seqs)} sequences, {sum(lengths)} tokens, lengths "
          f"{spread}, budget {args.budget} tokens")  # fmt: skip

    score_sequences(model, seqs[:2], token_budget=args.budget)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    scores: dict[str, torch.Tensor] = {}
    peaks: dict[str, int | None] = {}
    for r in range(args.repeats):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:  # interleaved, rotated
            with peak_memory("cpu") as peak:
                t0 = time.perf_counter()
                scores[mode] = score_sequences(model, seqs, token_budget=args.budget, mode=mode)
                times[mode].append(time.perf_counter() - t0)
            peaks[mode] = max(peaks.get(mode) or 0, peak.total or 0) or None
            print(f"  repeat {r}: {mode:>13} {times[mode][-1]:7.2f} s", flush=True)
    med = {m: statistics.median(times[m]) for m in MODES}
    rate = {m: len(seqs) / med[m] for m in MODES}
    diff = {m: float((scores[m] - scores["packed"]).abs().max()) for m in MODES}
    scale = float(scores["packed"].abs().max())
    rows = []
    for m in MODES:
        s = slots(lengths, m, args.budget)
        peak = f"{peaks[m] / 2**20:.0f}" if peaks[m] else "n/a"
        rows.append(f"| {m} | {med[m]:.2f} | {rate[m]:.2f} | {rate['packed'] / rate[m]:.2f} | {s} | "
                    f"{s / sum(lengths):.2f} | {diff[m]:.1e} | {peak} |")  # fmt: skip
    table = "\n".join(
        [
            "| method | s (median) | sequences/s | packed speed-up | token slots | slots / real tokens | max abs score "
            "diff vs packed | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]  # fmt: skip
    )
    print(table)
    print(f"packed / padded: {rate['packed'] / rate['padded']:.2f}x, packed / padded_sorted: "
          f"{rate['packed'] / rate['padded_sorted']:.2f}x (score scale {scale:.2f})")  # fmt: skip
    cmd = "nice python benchmarks/bench_reward_models.py" + (" --quick" if args.quick else "")
    load = os.getloadavg()[0]
    text = f"""# Reward-model scoring throughput: packed vs padded

- Command: `{cmd}` ({args.threads} threads, {args.dtype})
- Date: {datetime.date.today()}; commit {git_commit()}; machine: {machine()}
- Model: {source} with a fresh score head (`RewardModel`), scored through `score_sequences`
- Load average at the end: {load:.1f} (shared box; the methods ran interleaved, median of {args.repeats})

{len(seqs)} sequences of {min(lengths)}-{max(lengths)} tokens (log-normal, median {int(statistics.median(lengths))},
{sum(lengths)} tokens in all), random token ids; every method gets at most {args.budget} tokens (slots) per forward.

{table}

"packed speed-up" is packed's sequences/s over the method's. Token slots: what each method computes (real tokens plus
padding); packed computes only the real tokens (one varlen forward per best-fit chunk), padded pads every batch to its
longest sequence. Scores agree across methods (the last column, against a score scale of {scale:.2f}).
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
