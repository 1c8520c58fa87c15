"""GRPO step time with the rewards scored while the old/reference log-probs are inferred (`rewards.overlap=true`,
the trainer's default) against scoring them first (`rewards.overlap=false`), in one run.

The trainer (`r1engine.trainer.GRPOTrainer`, native rollout engine) has a reference model (`grpo.beta` > 0) and two
mini-batches per rollout, so each step infers both the old and the reference log-probs. Half of the prompts are
arithmetic word problems routed to rule rewards (`math_accuracy` + `format`, in a reward worker process), half are
open-ended "general" prompts routed to a pairwise reward model (`rm:helpful`, round robin within each group, on its
scorer thread) plus `format`. Models: a random Qwen2-family policy and a reward model with a random body of the same
shape and a fresh head (`--smollm2`: SmolLM2-135M-Instruct as policy and as reward-model body).

One trainer runs every step; each step is a whole GRPO step as `GRPOTrainer.run` does it (rollout, scoring,
inference, mini-batch updates, weight sync), with `rewards.overlap` switched between steps: pairs of steps, one per
mode, the order alternating between pairs, after a warm-up pair. `grpo.lr` is 1e-12: the update runs whole but
leaves the weights, so every step samples from the same policy (trained for real against the random reward model,
the policy changes what it generates from step to step, SmolLM2 towards ever shorter completions, and with it the
work being timed).

The parts come from the trainer's own metrics: `time/rollout_s` (generation), `time/inference_s` (old + reference
log-probs), `time/reward_wait_s` (waiting for the rewards: after the inference with overlap, before it without),
`time/train_s`; `window_s`, inference + reward wait, is the part that the switch changes. Prints the median of each
per mode and the speed-ups (without overlap / with) of the step and of the window, from the medians and as the
median of the per-pair ratios (the two steps of a pair share the box's load); writes
benchmarks/results/reward_overlap.md (and the per-step times as JSON with `--json`).

    nice python benchmarks/bench_reward_overlap.py              # default sizes, a few minutes on 2 shared cores
    nice python benchmarks/bench_reward_overlap.py --quick      # tiny models, one measured pair (the test's size)
    nice python benchmarks/bench_reward_overlap.py --smollm2 --pairs 4 --prompts 4 --max-new-tokens 32
                                                                # SmolLM2-135M-Instruct policy and reward model

`main(argv)` returns the result as a dict (the test calls it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import git_commit, machine, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
PARTS = ("step_s", "rollout_s", "inference_s", "reward_wait_s", "train_s")  # the trainer's time/* metrics
COLUMNS = (*PARTS, "window_s")
MODES = ("overlap", "no_overlap")
TOPICS = ["rivers", "bread", "chess", "rain", "owls", "glass", "bees", "maps", "tea", "salt", "kites", "moss"]
ROUTES = "rewards.routes={math: {math_accuracy: 1.0, format: 1.0}, general: {'rm:helpful': 1.0, format: 0.5}}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="measured steps per mode")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (half math, half general)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random policy and RM body")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training.num_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny models and batch, one measured pair")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct as policy and RM body")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/reward_overlap.md "
                        "(reward_overlap_smollm2.md with --smollm2)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.prompts, args.group_size, args.max_new_tokens = 1, 4, 2, 8
        args.hidden, args.layers = 72, 2
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"reward_overlap{'_smollm2' if args.smollm2 else ''}.md"
    if args.smollm2 and not (SMOLLM2 / "config.json").is_file():
        parser.error(f"--smollm2: no model at {SMOLLM2} (bash scripts/fetch_smollm2.sh fetches it)")
    return args


def rows(n: int) -> list[dict[str, str]]:
    """Math rows and general rows alternating (the stream keeps their order: half of each per step)."""
    from r1engine.data.word_problems import generate

    math = [{"prompt": q, "answer": str(a), "data_source": "math"} for q, a in generate(n, seed=5)]
    general = [{"prompt": f"Write two sentences about {TOPICS[i % len(TOPICS)]}.", "data_source": "general",
                "answer": f"Some words on {TOPICS[i % len(TOPICS)]}."} for i in range(n)]  # fmt: skip
    return [row for pair in zip(math, general, strict=True) for row in pair]


def make_models(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(policy directory, reward-model directory): a pairwise reward model on a body like the policy's."""
    import torch
    from transformers import AutoTokenizer

    from r1engine.models.tiny_hf import make_tiny_hf_model
    from r1engine.reward_models import RewardFormat, RewardModel

    if args.smollm2:
        policy = body = SMOLLM2
    else:
        heads = max(2, args.hidden // 32)
        shape = dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                     num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else 1)  # fmt: skip
        policy = make_tiny_hf_model("qwen2", root / "policy", seed=0, **shape)
        body = make_tiny_hf_model("qwen2", root / "rm_body", seed=1, **shape)
    rm = RewardModel.from_pretrained(body, fmt=RewardFormat(kind="pairwise", input="single"))
    rm.reset_head(3)
    with torch.no_grad():  # scores that differ between responses, so the advantages are not all 0
        rm.score.weight.mul_(50)
    rm.save_pretrained(root / "rm", AutoTokenizer.from_pretrained(body))
    return policy, root / "rm"


def overrides(out_dir: Path, policy: Path, rm: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"output_dir={out_dir}",
        f"model.path={policy}",
        "sft.steps=0",
        "grpo.steps=100000",
        f"grpo.prompts_per_step={args.prompts}",
        f"grpo.group_size={args.group_size}",
        "grpo.mini_batches=2",  # two optimizer steps per rollout: the old log-probs are inferred
        "grpo.beta=0.04",  # a reference model: its log-probs are inferred
        f"grpo.max_new_tokens={args.max_new_tokens}",
        "grpo.lr=1e-12",  # the whole update runs but leaves the weights: every step samples from the same policy
        "training.chunk_len=512",
        f"training.num_threads={args.threads}",
        "rollout.backend=native",
        "rollout.num_speculative_tokens=0",
        "data.shuffle=false",  # math and general rows alternate: half of each every step
        "data.eval_size=0",  # no held-out split (it would break the alternation); the benchmark never evaluates
        "eval.samples=1",
        "rewards.weights={}",
        ROUTES,
        f"reward_models={{helpful: {{path: {rm}}}}}",
    ]


def build_trainer(out_dir: Path, policy: Path, rm: Path, args: argparse.Namespace, *extra: str):
    """A GRPOTrainer ready to step (what `GRPOTrainer.run` sets up before its loop)."""
    from r1engine.trainer.config import load_config
    from r1engine.trainer.grpo import GRPOTrainer

    cfg = load_config(None, [*overrides(out_dir, policy, rm, args), *extra])
    trainer = GRPOTrainer(cfg, dataset=rows(max(24, args.prompts * (2 * args.pairs + 4))), progress=False)
    trainer._start_training()
    trainer._reset_reference()
    trainer._start_rollout()
    return trainer


def run_step(trainer: Any, step: int, overlap: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One GRPO step as `GRPOTrainer.run` takes it; (the step's metrics, its training fields)."""
    trainer.cfg.rewards.overlap = overlap
    t0 = time.perf_counter()
    seqs, fields, record = trainer.generate_and_score(step)
    t1 = time.perf_counter()
    record.update(trainer.train_on_rollout(seqs, fields, step))
    record["time/train_s"] = time.perf_counter() - t1
    trainer.sync_rollout_weights()
    record["time/step_s"] = time.perf_counter() - t0
    return record, fields


def markdown(result: dict[str, Any]) -> str:
    a, med = result["args"], result["median"]
    lines = [
        "| mode | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
        *(f"| {m} | " + " | ".join(f"{med[m][c]:.2f}" for c in COLUMNS) + " |" for m in MODES),
    ]
    return f"""# Reward scoring overlapped with the log-prob inference: GRPO step time with and without

- Command: `{result["command"]}`
- Date: {result["date"]}; commit {result["commit"]}; machine: {result["machine"]}
- Load average: {result["load"][0]:.2f} at the start, {result["load"][1]:.2f} at the end (shared box; the modes ran
  interleaved, order alternating per pair, {a["pairs"]} steps each after a warm-up pair)
- Models: {result["models"]}
- Torch threads: {a["threads"]}
- Step: {a["prompts"]} prompts (half math: `math_accuracy` + `format` in 1 reward worker; half general: `rm:helpful`,
  a pairwise reward model, round robin, + `format`) x G = {a["group_size"]}, up to {a["max_new_tokens"]} new tokens,
  `grpo.beta` 0.04 (reference model), 2 mini-batches (old log-probs inferred); native rollout engine, CPU

Median seconds per step. The parts are the trainer's `time/*` metrics; `step_s` adds the weight sync; `window_s` is
`inference_s + reward_wait_s`, the part of the step that `rewards.overlap` changes (rollout and training do the same
work in both modes).

{chr(10).join(lines)}

Speed-up from the overlap (without / with): step **{result["speedup"]:.2f}x** (median of the per-pair ratios
{result["paired_speedup"]:.2f}x, faster with overlap in {result["wins"]["step_s"]} of {a["pairs"]} pairs); inference +
reward wait {result["window_speedup"]:.2f}x (per pair {result["paired_window_speedup"]:.2f}x, faster in
{result["wins"]["window_s"]} of {a["pairs"]}).

## What the figures say

{result["notes"]}
"""


def notes(result: dict[str, Any]) -> str:
    """A short reading of the figures, written from them."""
    on, off = result["median"]["overlap"], result["median"]["no_overlap"]
    lo, hi = min(result["load"]), max(result["load"])
    spread, cores = result["step_ratio_range"], os.cpu_count()
    slower = on["inference_s"] > off["inference_s"]
    threads = result["args"]["threads"]
    why = (  # torch gives the scorer thread an intra-op team of its own, as large as the main thread's
        f": the reward model's thread ({threads} torch threads of its own) and the reward worker compute on the same "
        f"{cores} cores as the inference's {threads}"
        if slower
        else ""
    )
    return (
        f"Without overlap the trainer waits {off['reward_wait_s']:.2f} s for the rewards (the scoring left after the "
        f"rollout), then infers for {off['inference_s']:.2f} s. With overlap {on['reward_wait_s']:.2f} s of waiting "
        f"remains, {'but' if slower else 'and'} the inference takes {on['inference_s']:.2f} s{why}. Net, the "
        f"overlapped window goes from {off['window_s']:.2f} s to {on['window_s']:.2f} s "
        f"({result['paired_window_speedup']:.2f}x per pair) and the step from {off['step_s']:.2f} s to "
        f"{on['step_s']:.2f} s ({result['paired_speedup']:.2f}x per pair). The rollout and training do the same work "
        f"in both modes and differ only by the box's load (average {lo:.1f}-{hi:.1f} on {cores} cores): that is the "
        f"noise on the step ratio, which spans {spread[0]:.2f}x to {spread[1]:.2f}x across pairs. The overlap hides "
        "at most the shorter of scoring and inference; what it costs the inference depends on compute left beside "
        "it (idle cores for the rule rewards, a reward model on a device of its own), which this run does not have."
    )


def dirty_tree() -> bool:
    """Whether tracked files differ from HEAD (the figures then describe more than the commit)."""
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(out.strip())


def paired_ratio(times: dict[str, list[dict[str, float]]], column: str) -> float:
    """Median over pairs of (without overlap / with): the two steps of a pair share the box's load, which drifts."""
    return statistics.median(
        off[column] / on[column] for on, off in zip(times["overlap"], times["no_overlap"], strict=True)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    times: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_reward_overlap_") as tmp:
        policy, rm = make_models(Path(tmp), args)
        trainer = build_trainer(Path(tmp) / "run", policy, rm, args)
        vocab = trainer.model.config.vocab_size
        try:
            step = 0
            for pair in range(args.pairs + 1):  # pair 0 warms up
                order = MODES if pair % 2 == 0 else MODES[::-1]
                for mode in order:
                    record, _ = run_step(trainer, step, overlap=mode == "overlap")
                    step += 1
                    parts = {p: float(record[f"time/{p}"]) for p in PARTS}
                    parts["window_s"] = parts["inference_s"] + parts["reward_wait_s"]
                    if pair:
                        times[mode].append(parts)
                    print(f"  {'warm-up' if not pair else f'pair {pair}'}: {mode:>10} " +
                          " ".join(f"{p} {v:5.2f}" for p, v in parts.items()), flush=True)  # fmt: skip
        finally:
            trainer.close()
    median = {m: {c: statistics.median(t[c] for t in times[m]) for c in COLUMNS} for m in MODES}
    pairs = list(zip(times["overlap"], times["no_overlap"], strict=True))
    ratios = [off["step_s"] / on["step_s"] for on, off in pairs]
    cmd = " ".join(["nice python benchmarks/bench_reward_overlap.py", *(sys.argv[1:] if argv is None else argv)])
    models = (
        "SmolLM2-135M-Instruct (policy; reward model: its body with a fresh pairwise head)"
        if args.smollm2
        else f"random Qwen2-family policy and reward-model body (hidden {args.hidden}, {args.layers} layers, "
        f"byte-level BPE vocabulary of {vocab} tokens)"
    )
    result = {
        "command": cmd,
        "date": str(datetime.date.today()),
        "commit": git_commit() + (" + uncommitted changes" if dirty_tree() else ""),
        "machine": machine(),
        "load": [load_start, os.getloadavg()[0]],
        "models": models,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": times,
        "median": median,
        "speedup": median["no_overlap"]["step_s"] / median["overlap"]["step_s"],
        "paired_speedup": paired_ratio(times, "step_s"),
        "window_speedup": median["no_overlap"]["window_s"] / median["overlap"]["window_s"],
        "paired_window_speedup": paired_ratio(times, "window_s"),
        "step_ratio_range": [min(ratios), max(ratios)],
        "wins": {c: sum(on[c] < off[c] for on, off in pairs) for c in ("step_s", "window_s")},
    }
    result["notes"] = notes(result)
    for m in MODES:
        print(f"{m:>10}: median " + ", ".join(f"{c} {median[m][c]:.2f}" for c in COLUMNS))
    print(f"speed-up from the overlap (median step without / with): {result['speedup']:.2f}x (per pair "
          f"{result['paired_speedup']:.2f}x); inference + reward wait {result['window_speedup']:.2f}x (per pair "
          f"{result['paired_window_speedup']:.2f}x)")  # fmt: skip
    write_report(markdown(result), result, args.out, args.json)
    return result


if __name__ == "__main__":
    main()
