"""The native rollout engine's decode path on the CPU: one C++ call per decode step against the eager forward, and
each prompt prefilled once for its whole group against once per sample. All arms in the same run, interleaved, one
thread.

1. One decode step of the demo policy (the next-token logits of every row, the KV-cache write included) at 64, 16
   and 1 rows with 40-80 cached keys: `FusedDecodeStep` (`torch.ops.r1engine.decode_step`) against the eager
   `PolicyModel.forward(..., kv_cache=...)` + `PolicyModel.logits` the engine ran before.
2. Whole generations of bench_vs_trl's rollout (8 addition prompts x 8 samples, up to 72 new tokens, temperature 1,
   the demo policy without MTP), with its short prompts and with the prompts inside DeepSeek-R1-Zero's template
   (~300 characters): the engine as it is (fused step, shared prefill); the fused step switched off; and the engine
   before both changes (fused step off, every sample prefilled on its own: each prompt passed 8 times with n=1,
   which is what the prefill did for n=8).
3. Speculative decoding with the MTP layer (k = 1, 2) of the demo policy fitted for 200 steps on the toy pattern
   task (`r1engine.models.toy`, so that drafts get accepted): verify and drafting forwards through the fused layers
   (`torch.ops.r1engine.decode_layers`) against the eager layers, beside the plain fused step (k = 0), at one
   prompt and at 16 prompts x 4 samples, 64 new tokens.

    python benchmarks/bench_decode_step.py [--repeats 7]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, machine, time_per_call  # noqa: E402
from r1engine import _ext, settings  # noqa: E402
from r1engine.data import AdditionTask  # noqa: E402
from r1engine.models import KVCache, PolicyConfig, PolicyModel, build_char_tokenizer  # noqa: E402
from r1engine.models.decode_step import FusedDecodeStep  # noqa: E402
from r1engine.rollout import create_engine  # noqa: E402

ROWS = (64, 16, 1)
R1_ZERO_TEMPLATE = (  # the prompt template of DeepSeek-R1-Zero's training (the R1 paper, table 1)
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def demo_model() -> tuple[PolicyModel, object]:
    tok = build_char_tokenizer()
    model = PolicyModel(PolicyConfig.demo(vocab_size=len(tok), num_mtp_layers=0)).eval().requires_grad_(False)
    model.reset_parameters(seed=0)
    return model, tok


def step_case(model: PolicyModel, rows: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one decode step, fused and eager, over caches holding 40-80 keys per row."""
    cfg = model.config
    gen = torch.Generator().manual_seed(rows)
    lengths = torch.randint(40, 81, (rows,), generator=gen)
    cache = KVCache(cfg.num_layers, rows, 96, cfg.num_kv_heads, cfg.head_dim)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    cache.advance(lengths)
    tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=gen)
    step = FusedDecodeStep.build(model, cache)
    assert step is not None, "the fused decode step does not apply to the demo policy on this build"

    def fused() -> torch.Tensor:
        return step(tokens, cache)

    def eager() -> torch.Tensor:  # the module-by-module forward (the switch also keeps decode_layers out of it)
        with settings.override(fused_decode_step=False):
            out = model(tokens[:, None], position_ids=cache.lengths[:, None], kv_cache=cache)
        return model.logits(out.hidden[:, 0])

    with torch.no_grad():
        assert torch.equal(fused(), eager())  # bit for bit (tests/test_decode_step.py checks the grid)
        ours, base = [], []
        for _ in range(repeats):
            ours.append(time_per_call(fused, 30))
            base.append(time_per_call(eager, 30))
    return statistics.median(ours), statistics.median(base)


def generation_case(model: PolicyModel, tok, template: str, repeats: int) -> tuple[dict[str, float], int, float]:
    """Median seconds of a whole rollout per arm, the tokens it produced and the mean prompt length."""
    engine = create_engine("native", model=model, max_model_len=512)
    prompts = [[tok.bos_token_id, *tok.encode(template.format(prompt=p.prompt), add_special_tokens=False)]
               for p in AdditionTask().train_problems(seed=0).take(8)]  # fmt: skip
    group = 8
    arms = {  # name: (fused step on, prompts, n)
        "fused step + shared prefill (now)": (True, prompts, group),
        "eager step + shared prefill": (False, prompts, group),
        "eager step + per-sample prefill (before)": (False, [p for p in prompts for _ in range(group)], 1),
    }
    tokens = 0

    def generate(fused: bool, batch: list[list[int]], n: int) -> float:
        nonlocal tokens
        t0 = time.perf_counter()
        with settings.override(fused_decode_step=fused):
            out = engine.generate(
                batch, n=n, max_new_tokens=72, temperature=1.0, seed=1, stop_token_ids=[tok.eos_token_id]
            )
        elapsed = time.perf_counter() - t0
        tokens = out.stats.num_tokens
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in arms}
    for arm in arms.values():
        generate(*arm)
    for _ in range(repeats):
        for name, arm in arms.items():
            times[name].append(generate(*arm))
    return {name: statistics.median(t) for name, t in times.items()}, tokens, statistics.mean(map(len, prompts))


def speculative_generate(engine, prompts: list[list[int]], n: int, k: int, fused: bool):
    with settings.override(fused_decode_step=fused):
        return engine.generate(prompts, n=n, max_new_tokens=64, temperature=1.0, seed=3, num_speculative_tokens=k)


def speculative_case(repeats: int) -> list[str]:
    """Table rows: tokens/s of speculative generation with fused vs eager layers, and of the plain fused step."""
    from r1engine.models.toy import fit_pattern, pattern_batch

    torch.manual_seed(0)
    model = PolicyModel(PolicyConfig.demo(num_mtp_layers=1, max_position_embeddings=256))
    fit_pattern(model, 200, batch=16, length=24, lr=3e-3, seed=0)
    model.eval().requires_grad_(False)
    engine = create_engine("native", model=model)
    rows = []
    for n_prompts, n in ((1, 1), (16, 4)):
        prompts = pattern_batch(n_prompts, 3, torch.Generator().manual_seed(7)).tolist()
        arms = {"k=0, fused step": (0, True)}
        for k in (1, 2):
            arms[f"k={k}, fused layers"] = (k, True)
            arms[f"k={k}, eager layers"] = (k, False)
        times: dict[str, list[float]] = {name: [] for name in arms}
        stats = {}

        for k, fused in arms.values():
            speculative_generate(engine, prompts, n, k, fused)
        for _ in range(repeats):
            for name, (k, fused) in arms.items():
                out = speculative_generate(engine, prompts, n, k, fused)
                times[name].append(out.stats.elapsed_s)
                stats[name] = out.stats
        for name, t in times.items():
            st, eager = stats[name], name.replace("fused layers", "eager layers")
            speedup = f"{statistics.median(times[eager]) / statistics.median(t):.2f}x" if eager != name else "-"
            acc = f"{st.acceptance_rate:.2f}" if st.num_drafted else "-"
            rows.append(
                f"| {n_prompts}x{n} | {name} | {st.num_tokens / statistics.median(t):.0f} | {speedup} | {acc} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_step.md"))
    a = parser.parse_args()
    if not _ext.has_op("decode_step"):
        sys.exit("the compiled extension (torch.ops.r1engine.decode_step) is not built: run make setup")
    torch.set_num_threads(1)
    model, tok = demo_model()

    step_lines = ["| rows | fused step (ms) | eager step (ms) | speedup |", "|---|---|---|---|"]
    for rows in ROWS:
        ours, base = step_case(model, rows, a.repeats)
        step_lines.append(f"| {rows} | {ours * 1e3:.2f} | {base * 1e3:.2f} | {base / ours:.2f}x |")
        print(step_lines[-1], flush=True)
    gen_lines = ["| prompts | engine | rollout (s) | time / now |", "|---|---|---|---|"]
    for label, template in (("addition", "{prompt}"), ("R1-Zero template", R1_ZERO_TEMPLATE)):
        gen, tokens, prompt_len = generation_case(model, tok, template, a.repeats)
        now = gen["fused step + shared prefill (now)"]
        for name, t in gen.items():
            gen_lines.append(f"| {label} ({prompt_len:.0f} tokens) | {name} | {t:.3f} | {t / now:.2f}x |")
            print(gen_lines[-1], f"{tokens} tokens generated", flush=True)

    spec_lines = [
        "| batch (prompts x n) | arm | tokens/s | fused / eager layers | acceptance |",
        "|---|---|---|---|---|",
    ]
    spec_lines += speculative_case(a.repeats)

    text = f"""# Native engine decode path: fused C++ step and shared prefill (CPU)

`benchmarks/bench_decode_step.py`, {datetime.date.today()}, commit {git_commit()}, {machine()}, one thread (a shared
box: the arms are interleaved, each figure is the median of {a.repeats} repeats).
Command: `python benchmarks/bench_decode_step.py --repeats {a.repeats}`

Model: the demo policy without MTP (hidden 192, 3 layers, 6/2 heads of 32, MLP 512, vocab {model.config.vocab_size}),
random weights, fp32.

## One decode step (next-token logits of every row, KV-cache write included; 40-80 cached keys per row)

The fused step's logits are bitwise equal to the eager step's (checked here, and over a grid of shapes and both
dtypes in tests/test_decode_step.py).

{chr(10).join(step_lines)}

## Whole rollouts (8 prompts x 8 samples, up to 72 new tokens, stop at EOS)

{chr(10).join(gen_lines)}

## Speculative decoding (MTP, demo policy + 1 MTP layer fitted 200 steps on the toy pattern task, 64 new tokens)

Verify forwards (k+1 tokens per row) and drafting forwards of the MTP layer through the fused layers
(`decode_layers`) against the eager layers; the plain fused step (k=0) beside them. Tokens/s from the median time.

{chr(10).join(spec_lines)}
"""
    Path(a.out).write_text(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
