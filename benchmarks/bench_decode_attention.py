"""Decode-step attention of the native rollout engine: the C++ kernel against SDPA with a ragged mask (CPU).

Two measurements, both arms in the same run, interleaved, one thread:

1. The op alone: `torch.ops.r1engine.decode_attention(q, k, v, n_keys)` against what `KVCache.attend` ran before
   it, `F.scaled_dot_product_attention` over the cache slice with a per-row key mask and `enable_gqa=True`, at
   the decode shapes of the demo policy (64 rows, 6 query / 2 KV heads of 32, ~40-80 cached keys) and two more.
2. Whole generations: `NativeEngine.generate` of the demo policy (64 completions of up to 72 tokens, no
   speculation) with `r1engine.settings` `decode_attention_kernel` on and off, both through the eager decode step
   (the fused C++ step, which needs the kernel, is off in both arms so that only the attention differs; its own
   benchmark is bench_decode_step.py).

    python benchmarks/bench_decode_attention.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, machine, time_per_call  # noqa: E402
from r1engine import _ext, settings  # noqa: E402

SHAPES = [  # (name, rows, q heads, kv heads, head dim, keys: lowest, highest)
    ("demo policy (bench_vs_trl)", 64, 6, 2, 32, 40, 80),
    ("Qwen2.5-0.5B heads, 256 keys", 16, 14, 2, 64, 128, 256),
    ("multi-head, 1k keys", 8, 8, 8, 64, 512, 1024),
]


def op_case(rows: int, hq: int, hkv: int, d: int, lo: int, hi: int, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, hq, d, generator=g)
    k, v = (torch.randn(rows, hkv, hi + 1, d, generator=g) for _ in range(2))
    n_keys = torch.randint(lo, hi + 1, (rows,), generator=g)
    used = int(n_keys.max())
    mask = (torch.arange(used)[None, :] < n_keys[:, None])[:, None, None, :]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q[:, :, None], k[:, :, :used], v[:, :, :used], attn_mask=mask, enable_gqa=True
        )[:, :, 0]

    def kernel() -> torch.Tensor:
        return torch.ops.r1engine.decode_attention(q, k, v, n_keys, d**-0.5)

    torch.testing.assert_close(kernel(), sdpa(), rtol=1e-5, atol=1e-5)
    calls = 50
    ours, base = [], []
    for _ in range(repeats):
        ours.append(time_per_call(kernel, calls) * 1e6)
        base.append(time_per_call(sdpa, calls) * 1e6)
    return statistics.median(ours), statistics.median(base)


def generation_case(repeats: int) -> tuple[float, float, int]:
    from r1engine.data import AdditionTask
    from r1engine.models import PolicyConfig, PolicyModel, build_char_tokenizer
    from r1engine.rollout import create_engine

    tok = build_char_tokenizer()
    model = PolicyModel(PolicyConfig.demo(vocab_size=len(tok), num_mtp_layers=0)).eval()
    model.reset_parameters(seed=0)
    engine = create_engine("native", model=model, max_model_len=256)
    prompts = [[tok.bos_token_id, *tok.encode(p.prompt, add_special_tokens=False)]
               for p in AdditionTask().train_problems(seed=0).take(8)]  # fmt: skip

    def generate(on: bool) -> float:
        # both arms step through the eager forward (the fused step needs the kernel)
        with settings.override(decode_attention_kernel=on, fused_decode_step=False):
            t0 = time.perf_counter()
            out = engine.generate(prompts, n=8, max_new_tokens=72, temperature=1.0, seed=1)
            elapsed = time.perf_counter() - t0
        assert out.stats.num_tokens > 0
        return elapsed

    generate(True)
    generate(False)
    ours, base = [], []
    for _ in range(repeats):
        ours.append(generate(True))
        base.append(generate(False))
    return statistics.median(ours), statistics.median(base), len(prompts) * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_attention.md"))
    a = parser.parse_args()
    if not _ext.has_op("decode_attention"):
        sys.exit("the compiled extension (torch.ops.r1engine.decode_attention) is not built: run make setup")
    torch.set_num_threads(1)

    lines = ["| shape | rows | heads q/kv x dim | keys | kernel (us) | SDPA + mask (us) | speedup |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows, hq, hkv, d, lo, hi in SHAPES:
        ours, base = op_case(rows, hq, hkv, d, lo, hi, a.repeats)
        cells = [name, rows, f"{hq}/{hkv} x {d}", f"{lo}-{hi}", f"{ours:.0f}", f"{base:.0f}", f"{base / ours:.2f}x"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(lines[-1], flush=True)
    gen_ours, gen_base, n = generation_case(a.repeats)
    print(f"generation: kernel {gen_ours:.3f} s, SDPA {gen_base:.3f} s", flush=True)

    text = f"""# Decode-step attention (CPU)

`benchmarks/bench_decode_attention.py`, {datetime.date.today()}, commit {git_commit()}, {machine()},
1 thread, median of {a.repeats} interleaved repeats (a shared machine: compare the ratios).
Both arms give the same output (checked, fp32, 1e-5).

The op: `torch.ops.r1engine.decode_attention` (csrc/core/decode_attention.*: one task per row and KV head, keys
in blocks of 8 with one transpose-reduce, vectorized exp, P.V with the accumulators in registers, fixed loop
bounds for head dims 32/64/128) against SDPA with a ragged key mask and `enable_gqa`, which `KVCache.attend` ran
for every decode step before.

{chr(10).join(lines)}

Whole generation (`NativeEngine.generate`, demo policy, {n} completions of up to 72 tokens, no speculation, both
arms through the eager decode step):
**{gen_ours:.3f} s with the kernel, {gen_base:.3f} s with SDPA ({gen_base / gen_ours:.2f}x)**.
"""
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
