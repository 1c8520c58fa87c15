"""The Hugging Face families in r1engine's `PolicyModel` against transformers' own model on the same weights, on
this CPU, fp32, one thread; all arms in the same run, interleaved, medians.

1. Per family (Qwen2, Llama, Qwen3 with random weights at a small realistic shape, and SmolLM2-135M-Instruct when
   models/SmolLM2-135M-Instruct exists), after checking once that both models give the same logits:

   a. Decoding `--steps` tokens per row after a 128-token prompt, at 16 rows and at 1 row: r1engine's
      `FusedDecodeStep` over its `KVCache` against transformers' `*ForCausalLM` (sdpa attention, its default)
      fed one token per step with `use_cache=True` and its `DynamicCache`. Prefill not timed; tokens/s = rows x
      steps / seconds. Beside them, the lm_head GEMM alone (`[rows, hidden] x [hidden, vocab]`) as a share of
      r1engine's step: the part no fusion of the layers can remove.
   b. Forward + backward of a packed batch of `--seqs` sequences of 40-200 tokens (prompts of 16-32 tokens, the rest
      "completion"), loss = mean cross-entropy of the completion tokens: r1engine as its GRPO trainer runs it
      (`build_sequences` + `pack` + `packed_forward`, lm_head on the loss positions only) against transformers on
      the batch TRL's GRPOTrainer builds (prompts left-padded, completions right-padded, attention mask,
      `logits_to_keep` = completion block + 1; position ids from the mask, which TRL leaves out). Tokens/s counts
      real tokens only. Extra peak memory: peak RSS of one step over the RSS before it (free heap handed back with
      malloc_trim, then the high-water mark reset through /proc/self/clear_refs).

2. Memory and time of the loss part of one GRPO step at SmolLM2-135M's head (hidden 576, vocab 49,152) for
   `--loss-tokens` completion tokens (16 sequences, old + ref log-probs, beta 0.04 k3, eps 0.2,
   seq-mean-token-mean), hidden states and lm_head weight in, their gradients out: r1engine's `linear_grpo_loss`,
   its `grpo_loss` on materialised logits (as the trainer calls it, and with `inplace_backward`), the eager
   baseline (`log_softmax(logits.float())` -> gather -> clipped surrogate + KL as TRL writes them) and the same
   with TRL's own `selective_log_softmax` (per-row logsumexp). Each arm runs in a fresh subprocess (warm-up on 256
   tokens, then one measured step); extra peak = peak RSS of the step minus the RSS before it (PyTorch keeps no
   statistics of its CPU allocations, so RSS is the measure).

bf16 is not timed: the probe printed in the header shows what a bf16 matmul costs on a CPU without bf16 instructions.

    python benchmarks/bench_hf_families.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, machine, time_per_call  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
VOCAB = 49152
PROMPT_LEN = 128
ROWS = (16, 1)
# the random families: 4 layers, SmolLM2-135M's widths; Qwen3 with q/k heads of 64 wider than hidden / heads
SHAPES = {
    "qwen2": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
    "llama": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
    "qwen3": dict(hidden_size=512, num_attention_heads=12, num_key_value_heads=4, head_dim=64),
}
LOSS_ARMS = ("linear_grpo_loss", "grpo_loss", "grpo_loss inplace", "eager log_softmax", "eager TRL selective")
LOSS_SEQS, LOSS_HIDDEN = 16, 576


# ---------------------------------------------------------------------------------------------------------------
# memory probe: the resident set's high-water mark, reset before the measured work


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured(fn) -> tuple[float, float, object]:
    """Seconds of `fn()`, MiB its resident set peaked above the size before it, and what `fn` returned. Free heap
    memory is handed back first (malloc_trim), so that what earlier steps left in glibc's free lists neither
    hides this step's allocations nor counts as its own."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_kib()
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    return elapsed, (rss_kib("VmHWM") - before) / 1024, out


# ---------------------------------------------------------------------------------------------------------------
# the models


def random_family(family: str, layers: int, tmp: str):
    """A random transformers model of `family` (norms and biases perturbed, as `make_tiny_hf_model` does, so every
    weight matters), saved to `tmp` and loaded from there by both libraries."""
    from transformers import AutoModelForCausalLM

    from r1engine.models import PolicyModel
    from r1engine.models.tiny_hf import tiny_config

    config = tiny_config(family, VOCAB, intermediate_size=1536, num_hidden_layers=layers, **SHAPES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return hf, PolicyModel.from_pretrained(tmp)


def describe(policy) -> str:
    c = policy.config
    extra = ", q/k norm" if c.qk_norm else ""
    extra += ", qkv bias" if c.qkv_bias else ""
    extra += ", tied head" if c.tie_word_embeddings else ""
    extra += f", {c.rope_scaling['rope_type']} RoPE" if c.rope_scaling else ""
    return (
        f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads of {c.head_dim}, "
        f"MLP {c.intermediate_size}{extra}"
    )


# ---------------------------------------------------------------------------------------------------------------
# 1a. decoding


def decode_case(hf, policy, rows: int, steps: int, repeats: int) -> dict:
    """Seconds to decode `steps` tokens per row after a PROMPT_LEN prompt, r1engine and transformers (medians)."""
    from transformers import DynamicCache

    from r1engine.models import KVCache
    from r1engine.models.decode_step import FusedDecodeStep

    cfg = policy.config
    gen = torch.Generator().manual_seed(rows)
    prompt = torch.randint(0, cfg.vocab_size, (rows, PROMPT_LEN), generator=gen)
    tokens = torch.randint(0, cfg.vocab_size, (steps, rows), generator=gen)
    with torch.no_grad():
        cache = KVCache(cfg.num_layers, rows, PROMPT_LEN + steps, cfg.num_kv_heads, cfg.head_dim)
        policy(prompt, kv_cache=cache)
        cache.advance(PROMPT_LEN)
        hf_cache = DynamicCache(config=hf.config)
        hf(input_ids=prompt, past_key_values=hf_cache, use_cache=True)
        fused = FusedDecodeStep.build(policy, cache)
        if fused is None:
            print("  the fused decode step does not apply: timing the eager cached forward", flush=True)

        def ours_step(tok: torch.Tensor) -> torch.Tensor:
            if fused is not None:
                return fused(tok, cache)
            return policy.logits(policy(tok[:, None], kv_cache=cache).hidden[:, 0])

        def base_step(tok: torch.Tensor) -> torch.Tensor:
            return hf(input_ids=tok[:, None], past_key_values=hf_cache, use_cache=True).logits[:, -1]

        def ours() -> None:
            for tok in tokens:
                ours_step(tok)
                cache.advance(1)

        def base() -> None:
            for tok in tokens:
                base_step(tok)

        def reset() -> None:
            cache.lengths.fill_(PROMPT_LEN)
            if hf_cache.get_seq_length() > PROMPT_LEN:
                hf_cache.crop(PROMPT_LEN - hf_cache.get_seq_length())  # negative: tokens to drop

        hidden = torch.randn(rows, cfg.hidden_size, generator=gen)

        def head() -> None:  # the lm_head GEMM alone, as many times as there are steps
            for _ in tokens:
                policy.logits(hidden)

        diff = (ours_step(tokens[0]) - base_step(tokens[0])).abs().max().item()
        reset()
        times: dict[str, list[float]] = {"ours": [], "base": [], "head": []}
        for _ in range(repeats):
            for name, fn in (("ours", ours), ("base", base), ("head", head)):
                times[name].append(timed(fn, reset))
    return {
        "ours": statistics.median(times["ours"]),
        "base": statistics.median(times["base"]),
        "head": statistics.median(times["head"]),
        "diff": diff,
        "fused": fused is not None,
    }


def timed(fn, reset) -> float:
    """Seconds of one `fn()` between two `reset()`s (not timed)."""
    reset()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    reset()
    return elapsed


# ---------------------------------------------------------------------------------------------------------------
# 1b. packed forward + backward against the padded batch


def train_case(hf, policy, num_seqs: int, repeats: int) -> dict:
    """Seconds and extra peak MiB of one forward + backward, r1engine packed and transformers padded (medians)."""
    from r1engine.trainer.sequences import build_sequences, loss_tokens, pack, packed_forward

    vocab = policy.config.vocab_size
    gen = torch.Generator().manual_seed(num_seqs)
    lengths = torch.randint(40, 201, (num_seqs,), generator=gen).tolist()
    prompt_lens = torch.randint(16, 33, (num_seqs,), generator=gen).tolist()
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]

    # r1engine: the trainer's packing (chunk_len = training.chunk_len's default) and packed forward
    split = list(zip(seqs, prompt_lens, strict=True))
    batch, _ = pack(build_sequences([s[:p].tolist() for s, p in split], [s[p:].tolist() for s, p in split]), 1024)
    tokens = loss_tokens(batch)

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        logits = policy.logits(packed_forward(policy, batch).hidden[tokens.index])
        loss = F.cross_entropy(logits, tokens.targets)
        loss.backward()
        return logits.detach(), loss.detach()

    # transformers: TRL's batch (prompts left-padded, completions right-padded), logits of the completion block
    width_p, width_c = max(prompt_lens), max(n - p for n, p in zip(lengths, prompt_lens, strict=True))
    ids = torch.zeros(num_seqs, width_p + width_c, dtype=torch.long)
    mask = torch.zeros_like(ids)
    completion = torch.zeros(num_seqs, width_c, dtype=torch.long)
    completion_mask = torch.zeros(num_seqs, width_c)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        c = len(s) - p
        ids[i, width_p - p : width_p + c] = s
        mask[i, width_p - p : width_p + c] = 1
        completion[i, :c], completion_mask[i, :c] = s[p:], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    def base() -> tuple[torch.Tensor, torch.Tensor]:
        out = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=width_c + 1)
        logits = out.logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), completion.reshape(-1), reduction="none").view_as(
            completion_mask
        )
        loss = (ce * completion_mask).sum() / completion_mask.sum()
        loss.backward()
        return logits.detach(), loss.detach()

    def run(fn, model) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
        model.zero_grad(set_to_none=True)  # every step allocates its gradients (counted in the peak)
        return measured(fn)

    # once untimed (warm-up): the same loss and the same completion logits, sequence by sequence
    _, _, (logits_ours, loss_ours) = run(ours, policy)
    _, _, (logits_base, loss_base) = run(base, hf)
    seq_of_token = tokens.seq_ids[tokens.segment_ids]
    diff = max(
        (logits_ours[seq_of_token == i] - logits_base[i, : lengths[i] - prompt_lens[i]]).abs().max().item()
        for i in range(num_seqs)
    )
    del logits_ours, logits_base
    times: dict[str, list[float]] = {"ours": [], "base": []}
    peaks: dict[str, list[float]] = {"ours": [], "base": []}
    for _ in range(repeats):
        for name, fn, model in (("ours", ours, policy), ("base", base, hf)):
            t, peak, _ = run(fn, model)
            times[name].append(t)
            peaks[name].append(peak)
    policy.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    return {
        "ours": statistics.median(times["ours"]),
        "base": statistics.median(times["base"]),
        "peak_ours": statistics.median(peaks["ours"]),
        "peak_base": statistics.median(peaks["base"]),
        "tokens": sum(lengths),
        "loss_tokens": len(tokens.index),
        "padded": ids.numel(),
        "logit_rows": num_seqs * width_c,
        "diff": diff,
        "loss_diff": abs(loss_ours.item() - loss_base.item()),
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. the loss part of a GRPO step (one arm per subprocess)

GRPO_KW = dict(eps_low=0.2, eps_high=0.2, beta=0.04, kl_estimator="k3", agg="seq-mean-token-mean")


def loss_inputs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n` completion tokens of LOSS_SEQS sequences: hidden states and head weight (both trained), targets,
    advantages per sequence, old and ref log-probs near the current ones (so that some ratios clip)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, LOSS_HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, LOSS_HIDDEN, generator=gen) * 0.05
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(h @ weight.T, -1).gather(-1, t[:, None])[:, 0]
                          for h, t in zip(hidden.split(512), targets.split(512), strict=True)])  # fmt: skip
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "targets": targets,
        "segment_ids": torch.arange(n) * LOSS_SEQS // n,
        "advantages": torch.randn(LOSS_SEQS, generator=gen),
        "old": logp + 0.1 * torch.randn(n, generator=gen),
        "ref": logp + 0.1 * torch.randn(n, generator=gen),
    }


def eager_grpo_loss(logits: torch.Tensor, x: dict[str, torch.Tensor], logprobs) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss (loss_type "grpo", token-level ratio, k3 KL) on padded [S, T, V] logits."""
    s, t = logits.shape[:2]
    per_token_logps = logprobs(logits, x["targets"].view(s, t))
    coef_1 = torch.exp(per_token_logps - x["old"].view(s, t))
    coef_2 = torch.clamp(coef_1, 1 - GRPO_KW["eps_low"], 1 + GRPO_KW["eps_high"])
    advantages = x["advantages"][:, None]
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    delta = x["ref"].view(s, t) - per_token_logps
    per_token_loss = per_token_loss + GRPO_KW["beta"] * (torch.exp(delta) - delta - 1)
    mask = torch.ones(s, t)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def loss_step(arm: str, x: dict[str, torch.Tensor]) -> float:
    """One forward + backward of `arm` from hidden states and head weight to their gradients; returns the loss."""
    from r1engine.ops import grpo_loss, linear_grpo_loss

    x["hidden"].grad = x["weight"].grad = None
    n = len(x["targets"])
    packed = (x["targets"], x["advantages"], torch.ones(n), x["old"], x["ref"])
    if arm == "linear_grpo_loss":
        loss, _ = linear_grpo_loss(x["hidden"], x["weight"], *packed, segment_ids=x["segment_ids"], **GRPO_KW)
    elif arm in ("grpo_loss", "grpo_loss inplace"):
        logits = F.linear(x["hidden"], x["weight"])
        inplace = arm == "grpo_loss inplace"
        loss, _ = grpo_loss(logits, *packed, segment_ids=x["segment_ids"], inplace_backward=inplace, **GRPO_KW)
    else:
        logits = F.linear(x["hidden"], x["weight"]).view(LOSS_SEQS, n // LOSS_SEQS, VOCAB)
        if arm == "eager log_softmax":

            def logprobs(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return torch.log_softmax(lg.float(), -1).gather(-1, t[..., None]).squeeze(-1)

        else:
            from trl.trainer.utils import selective_log_softmax as logprobs
        loss = eager_grpo_loss(logits, x, logprobs)
    loss.backward()
    return loss.item()


def loss_worker(arm: str, inputs: str) -> None:
    torch.set_num_threads(1)
    if arm == "eager TRL selective":
        try:
            import trl.trainer.utils  # noqa: F401
        except ImportError as exc:
            print(json.dumps({"skipped": f"trl does not import ({exc})"}))
            return
    warm, x = torch.load(inputs)
    loss_step(arm, warm)  # warm-up on 256 tokens: first calls, thread pools
    del warm
    elapsed, peak, loss = measured(lambda: loss_step(arm, x))
    print(json.dumps({"time": elapsed, "peak": peak, "loss": loss}))


def loss_section(n: int, rounds: int) -> list[str]:
    results: dict[str, list[dict]] = {arm: [] for arm in LOSS_ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = str(Path(tmp) / "inputs.pt")
        torch.save((loss_inputs(256, seed=1), loss_inputs(n)), inputs)  # made once: the old/ref log-probs cost a GEMM
        for _ in range(rounds):
            for arm in LOSS_ARMS:
                cmd = [sys.executable, __file__, "--loss-worker", arm, "--loss-inputs", inputs]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"loss arm {arm!r} failed:\n{out.stderr[-3000:]}")
                results[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_mib = n * VOCAB * 4 / 2**20
    base = results["eager log_softmax"]
    base_time, base_peak = statistics.median(r["time"] for r in base), statistics.median(r["peak"] for r in base)
    lines = [
        "| arm | loss | step (s) | extra peak (MiB) | peak / logits | peak / eager | eager time / time |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        if "skipped" in runs[0]:
            lines.append(f"| {arm} | skipped: {runs[0]['skipped']} | | | | | |")
        else:
            t, peak = statistics.median(r["time"] for r in runs), statistics.median(r["peak"] for r in runs)
            lines.append(
                f"| {arm} | {runs[0]['loss']:.6f} | {t:.2f} | {peak:.0f} | {peak / logits_mib:.2f} | "
                f"{peak / base_peak:.2f} | {base_time / t:.2f}x |"
            )
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype) -> float:
    """GFLOP/s of a [256, 576] x [576, 1536] matmul (an MLP projection of 256 tokens) in `dtype`, one thread."""
    a, b = torch.randn(256, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    return 2 * 256 * 576 * 1536 / time_per_call(lambda: a @ b, 20 if dtype == torch.float32 else 3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens per row and repeat")
    parser.add_argument("--seqs", type=int, default=8, help="sequences in the forward + backward batch")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random families")
    parser.add_argument("--loss-tokens", type=int, default=4096)
    parser.add_argument("--loss-rounds", type=int, default=2, help="subprocesses per loss arm (interleaved)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 4 steps, 4 sequences, 1024 loss tokens")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_families.md"))
    parser.add_argument("--loss-worker", help=argparse.SUPPRESS)
    parser.add_argument("--loss-inputs", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.loss_worker:
        loss_worker(a.loss_worker, a.loss_inputs)
        return
    if a.quick:
        a.repeats, a.steps, a.seqs, a.loss_tokens, a.loss_rounds = 1, 4, 4, 1024, 1
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"matmul: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s (one thread)", flush=True)

    decode_lines = [
        "| model | rows | r1engine fused step (tok/s) | transformers + DynamicCache (tok/s) | r1engine / transformers "
        "| lm_head GEMM alone / r1engine step | max abs logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    train_lines = [
        "| model | real tokens (padded slots; logit rows) | r1engine packed (tok/s) | transformers padded (tok/s) "
        "| r1engine / transformers | extra peak MiB r1engine / transformers | max abs logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    models = [(family, f"{family} (random)") for family in SHAPES]
    if SMOLLM2.is_dir():
        models.append(("smollm2", "SmolLM2-135M-Instruct"))
    else:
        print(f"SmolLM2-135M-Instruct skipped: {SMOLLM2} does not exist (scripts fetch it)", flush=True)
    shapes = []
    for family, label in models:
        with tempfile.TemporaryDirectory() as tmp:
            if family == "smollm2":
                from transformers import AutoModelForCausalLM

                from r1engine.models import PolicyModel

                hf = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
                policy = PolicyModel.from_pretrained(SMOLLM2)
            else:
                hf, policy = random_family(family, a.layers, tmp)
        shapes.append(f"- {label}: {describe(policy)}, vocab {policy.config.vocab_size}")
        print(shapes[-1], flush=True)
        for rows in ROWS:
            r = decode_case(hf, policy, rows, a.steps, a.repeats)
            kind = "fused step" if r["fused"] else "eager step (fused n/a)"
            ours, base = rows * a.steps / r["ours"], rows * a.steps / r["base"]
            decode_lines.append(
                f"| {label} | {rows} | {ours:.0f}{'' if r['fused'] else f' ({kind})'} | {base:.0f} | "
                f"{ours / base:.2f}x | {r['head'] / r['ours']:.0%} | {r['diff']:.1e} |"
            )
            print(decode_lines[-1], flush=True)
        r = train_case(hf, policy, a.seqs, a.repeats)
        ours, base = r["tokens"] / r["ours"], r["tokens"] / r["base"]
        train_lines.append(
            f"| {label} | {r['tokens']} ({r['padded']}; {r['loss_tokens']} / {r['logit_rows']}) | {ours:.0f} | "
            f"{base:.0f} | {ours / base:.2f}x | {r['peak_ours']:.0f} / {r['peak_base']:.0f} | {r['diff']:.1e} |"
        )
        print(train_lines[-1], f"(loss diff {r['loss_diff']:.1e})", flush=True)
        del hf, policy
        gc.collect()

    loss_lines = loss_section(a.loss_tokens, a.loss_rounds)
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(["python", "benchmarks/bench_hf_families.py", *sys.argv[1:]])
    load = (load_start, os.getloadavg()[0])
    text = f"""# Hugging Face families: r1engine's PolicyModel against transformers on the same weights (CPU)

`benchmarks/bench_hf_families.py`, {datetime.date.today()}, commit {git_commit()}, {machine()}, one thread.
A shared box (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end): the arms are interleaved and
each figure is the median of {a.repeats} repeats; the run took {minutes:.1f} min.

Command: `{command}`

fp32 throughout. bf16 is not timed: on this CPU a bf16 matmul runs at {bf16:.1f} GFLOP/s against {fp32:.1f}
GFLOP/s in fp32 (one thread, [256, 576] x [576, 1536]), so both libraries would measure torch's bf16 fallback.

Models (random ones: transformers' own initialisation, norms and biases perturbed, saved with `save_pretrained` and
loaded from that directory by both libraries):

{chr(10).join(shapes)}

## Decoding ({PROMPT_LEN}-token prompt, then {a.steps} tokens per row, one per step; prefill not timed)

r1engine: `FusedDecodeStep` over a `KVCache`. transformers {_transformers_version()}: `*ForCausalLM` (sdpa
attention) called with one token per row and `use_cache=True` on its `DynamicCache`. Logit diff: the first
decoded step of both. lm_head column: the head's GEMM alone on `[rows, hidden]` states, timed in the same rounds,
over r1engine's whole step.

{chr(10).join(decode_lines)}

## Forward + backward of a packed batch ({a.seqs} sequences of 40-200 tokens, prompts of 16-32)

Loss: mean cross-entropy of the completion tokens. r1engine: `build_sequences` + `pack` (chunk_len 1024) +
`packed_forward`, lm_head on the loss positions only. transformers: TRL's batch layout (prompts left-padded,
completions right-padded, attention mask), `logits_to_keep` = completion block + 1, position ids from the mask.
Tokens/s counts real tokens; the padded batch's slots and the logit rows each side computes are in brackets.
Extra peak: resident-set high-water mark of one step over the resident set before it (gradients included).

{chr(10).join(train_lines)}

## The loss part of one GRPO step at SmolLM2-135M's head ({a.loss_tokens} completion tokens)

Hidden states `[{a.loss_tokens}, {LOSS_HIDDEN}]` and the lm_head weight `[{VOCAB}, {LOSS_HIDDEN}]` in, both
gradients out; {LOSS_SEQS} sequences, old and ref log-probs, beta 0.04 (k3), eps 0.2, seq-mean-token-mean. The
logits would be {a.loss_tokens * VOCAB * 4 / 2**20:.0f} MiB. `grpo_loss` runs as the trainer calls it
(`clipped_policy_loss`: logits materialised, separate gradient) and with `inplace_backward=True`; the eager arms
are TRL's `_compute_loss` ("grpo" loss) with `log_softmax(logits.float())` + gather, and with TRL's own
`selective_log_softmax` (per-row logsumexp). Each arm runs in a fresh subprocess (warm-up on 256 tokens, then one
measured step), {a.loss_rounds} round(s) interleaved; extra peak as above.

{chr(10).join(loss_lines)}
"""
    Path(a.out).write_text(text)
    print(f"wrote {a.out} ({minutes:.1f} min)")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
