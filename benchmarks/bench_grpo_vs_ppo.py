"""Benchmark: GRPO against PPO with a value model and GAE (lambda 0.95 and 1.0), the DeepSeekMath comparison.

One task (the addition task of configs/demo.yaml), one policy (the `demo` preset by default), one start: a
cold-start SFT is run once and saved with `save_pretrained`, and all three runs start from it (`model.init_from`).
Equal budget per step: 128 sampled completions and `grpo.mini_batches` optimizer steps of the policy.

- GRPO (the baseline here): 16 prompts x G = 8 completions, group-relative advantages, KL (k3) in the loss.
- PPO, lambda = 0.95 and lambda = 1.0 (gamma = 1): 128 prompts x 1 completion, a value model (the policy body +
  a scalar head, copied from the SFT policy) trained by its own AdamW, token-level GAE, whitened advantages,
  the KL to the reference as a per-token penalty in the reward (InstructGPT / DeepSeekMath PPO).

Each run is its own process (so its peak RSS is its own), one after another on one thread. Recorded: held-out
pass@1 over steps (R1 protocol: 4 samples at T = 0.6, top-p 0.95), the training state counted from the tensors
(parameters of policy, reference and value model, their gradients, AdamW state), the process's peak RSS, and
the mean step time (steps without an evaluation). Ratios are PPO / GRPO.

    python benchmarks/bench_grpo_vs_ppo.py [--steps 30] [--preset demo] [--sft-steps 200] [--num-eval 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

RUNS = ("grpo", "ppo-0.95", "ppo-1.0")
COMPLETIONS_PER_STEP = 128
GROUP_SIZE = 8
PPO_VALUE_LR_FACTOR = 10.0  # critic lr = 10x the policy's (as verl's PPO defaults); the head starts at zero


def _overrides(args: argparse.Namespace, run: str, run_dir: Path, sft_dir: Path) -> list[str]:
    common = [
        f"output_dir={run_dir}",
        f"model.init_from={sft_dir}",
        "sft.steps=0",
        f"grpo.steps={args.steps}",
        f"grpo.mini_batches={args.mini_batches}",
        f"task.num_eval={args.num_eval}",
        f"eval.every={args.eval_every}",
        "rollout.backend=native",
        "training.num_threads=1",
        "checkpoint.every=0",
        "checkpoint.resume=false",
    ]
    if run == "grpo":
        return [*common, f"grpo.prompts_per_step={COMPLETIONS_PER_STEP // GROUP_SIZE}", f"grpo.group_size={GROUP_SIZE}"]
    # PPO: one completion per prompt, the same completions per step; grpo.advantage is unused (see PPOTrainer).
    return [*common, f"grpo.prompts_per_step={COMPLETIONS_PER_STEP}", "grpo.group_size=1", "grpo.advantage=drgrpo"]


def _config(args: argparse.Namespace, overrides: list[str]):
    from r1engine.trainer.config import load_config

    preset = [f"model.preset={args.preset}"]
    return load_config(ROOT / "configs" / "demo.yaml", [*preset, *overrides])


# ---------------------------------------------------------------------------------------------- the SFT start
def cold_start(args: argparse.Namespace, sft_dir: Path) -> dict[str, Any]:
    """Cold-start SFT once (as the trainer would) and save the model every run starts from."""
    from r1engine.trainer.grpo import GRPOTrainer
    from r1engine.trainer.sft import cold_start_sft

    cfg = _config(args, [f"output_dir={sft_dir.parent / 'sft_run'}", f"sft.steps={args.sft_steps}"])
    torch.set_num_threads(1)
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        t0 = time.perf_counter()
        losses = cold_start_sft(
            trainer.model, trainer.task, trainer.stream, trainer.encode, trainer.eos_id,
            steps=cfg.sft.steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, chunk_len=cfg.training.chunk_len,
            mtp_coef=cfg.grpo.mtp_loss_coef, loss_backend=cfg.training.loss_backend, progress=False,
        )  # fmt: skip
        trainer.model.save_pretrained(sft_dir, trainer.tokenizer)
        return {"sft_steps": cfg.sft.steps, "final_ce": losses[-1], "seconds": time.perf_counter() - t0}
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------- one run
def _tensor_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def training_state_bytes(trainer) -> dict[str, int]:
    """Bytes of the training state, counted from the tensors: parameters of the policy, the reference and the
    value model; gradients (one per trainable parameter: they all exist between backward and the optimizer
    step); AdamW state. The rollout engine's own weight copy is listed apart (the same for every run)."""
    seen: set[int] = set()
    value = getattr(trainer, "value_model", None)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    if value is not None:
        trainable += [p for p in value.parameters() if p.requires_grad]
    optimizers = [trainer.train_engine.optimizer]
    if value is not None:
        optimizers.append(trainer.value_engine.optimizer)
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {
        "policy_params": _tensor_bytes(trainer.model.parameters(), seen),
        "reference_params": _tensor_bytes(trainer.ref_model.parameters(), seen) if trainer.ref_model else 0,
        "value_params": _tensor_bytes(value.parameters(), seen) if value is not None else 0,
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_state": _tensor_bytes(state, seen),
    }
    out["total"] = sum(out.values())
    out["rollout_engine_weights"] = _tensor_bytes(trainer.rollout.model.parameters(), set())
    return out


def run_one(args: argparse.Namespace, run: str, run_dir: Path, sft_dir: Path) -> dict[str, Any]:
    from r1engine.trainer.grpo import GRPOTrainer
    from r1engine.trainer.ppo import PPOConfig, PPOTrainer

    cfg = _config(args, _overrides(args, run, run_dir, sft_dir))
    if run == "grpo":
        trainer = GRPOTrainer(cfg, progress=False)
    else:
        lam = float(run.split("-")[1])
        ppo = PPOConfig(gamma=1.0, lam=lam, value_lr=PPO_VALUE_LR_FACTOR * cfg.grpo.lr)
        trainer = PPOTrainer(cfg, ppo, progress=False)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        summary = trainer.run()
        state = training_state_bytes(trainer)
    finally:
        trainer.close()
    return {
        "run": run,
        "state_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_run_bytes": rss_before_kb * 1024,
        "wall_s": summary["wall_s"],
        "num_parameters": {
            "policy": trainer.model.num_parameters(),
            "value": sum(p.numel() for p in trainer.value_model.parameters()) if run != "grpo" else 0,
        },
        **curves_and_times(run_dir),
    }


def curves_and_times(run_dir: Path) -> dict[str, Any]:
    """Held-out accuracy and reward curves, and step times (mean and median over steps without an evaluation),
    from a run's metrics log."""
    from r1engine.trainer.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    plain = [r for r in steps if "eval/accuracy" not in r] or steps  # steps without a held-out evaluation

    def column(key: str) -> list[float]:
        return [r[key] for r in plain if r.get(key) is not None]

    out: dict[str, Any] = {
        "accuracy": [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r],
        "greedy_accuracy": [(r["step"], r["eval/greedy_accuracy"]) for r in records if "eval/greedy_accuracy" in r],
        "reward": [(r["step"], r["reward/mean"]) for r in steps],
        "value_explained_variance": [(r["step"], r.get("value/explained_variance")) for r in steps],
        "step_s_median": statistics.median(column("time/step_s")),
    }
    for name in ("step", "train", "inference", "rollout"):
        vals = column(f"time/{name}_s")
        out[f"{name}_s"] = sum(vals) / len(vals)
    return out


# ---------------------------------------------------------------------------------------------- report
def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"grpo": "GRPO (G=8)", "ppo-0.95": "PPO, GAE λ=0.95", "ppo-1.0": "PPO, GAE λ=1.0"}
    for run, res in results.items():
        xs, ys = zip(*res["accuracy"], strict=True)
        ax[0].plot(xs, ys, marker="o", label=labels[run])
        xs, ys = zip(*res["reward"], strict=True)
        ax[1].plot(xs, ys, label=labels[run], alpha=0.8)
    ax[0].set(title="held-out pass@1 (4 samples, T=0.6)", xlabel="RL step", ylabel="pass@1")
    ax[1].set(title="training reward (accuracy + format)", xlabel="RL step", ylabel="mean reward")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _measured_summary(results: dict[str, dict]) -> list[str]:
    g = results["grpo"]
    out = []
    for run in RUNS:
        r = results[run]
        acc = [a for _, a in r["accuracy"]]
        out.append(
            f"- {run}: pass@1 {acc[0]:.3f} -> {acc[-1]:.3f} (best {max(acc):.3f}); training state "
            f"{r['state_bytes']['total'] / g['state_bytes']['total']:.2f}x GRPO's, step time "
            f"{r['step_s'] / g['step_s']:.2f}x GRPO's."
        )
    return out


def write_markdown(args, results: dict[str, dict], sft: dict, path: Path, png: Path, command: str) -> str:
    g = results["grpo"]
    lines = [
        "# GRPO vs PPO (value model + GAE) on the addition task",
        "",
        f"Date {datetime.date.today()}, commit {git_commit()}, machine: {platform.node()} ({cpu_name()}, "
        f"{os.cpu_count()} cores shared with other jobs, no GPU), PyTorch {torch.__version__}, one thread per run.",
        f"Command: `{command}`",
        "",
        f"Setup: `{args.preset}` policy ({g['num_parameters']['policy'] / 1e6:.2f}M parameters with its MTP layer), "
        f"one cold-start SFT of {sft['sft_steps']} steps (final CE {sft['final_ce']:.3f}) saved with "
        f"`save_pretrained`; all three runs start from it (`model.init_from`). {args.steps} RL steps each, "
        f"{COMPLETIONS_PER_STEP} completions per step (GRPO: {COMPLETIONS_PER_STEP // GROUP_SIZE} prompts x G = "
        f"{GROUP_SIZE}; PPO: {COMPLETIONS_PER_STEP} prompts x 1, the standard PPO sampling; same number of sampled "
        f"tokens per step up to length differences), {args.mini_batches} policy optimizer steps per rollout, "
        "policy lr 1e-4, clip 0.2, KL coefficient 0.001 (GRPO: k3 in the loss; PPO: per-token k1 penalty in the "
        f"reward), native rollout engine with MTP speculation. PPO: gamma = 1, value model = policy body + zero "
        f"scalar head ({results['ppo-0.95']['num_parameters']['value'] / 1e6:.2f}M parameters), AdamW at "
        f"{PPO_VALUE_LR_FACTOR:g}x the policy lr, clipped value loss (0.2), advantages whitened per rollout. "
        f"Held-out: {args.num_eval} problems never trained on, pass@1 = mean over 4 samples at T = 0.6, top-p "
        f"0.95 (the R1 protocol), every {args.eval_every} steps.",
        "",
        "## Held-out pass@1 over RL steps",
        "",
        "| step | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    steps = [s for s, _ in g["accuracy"]]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(f"{results[r]['accuracy'][i][1]:.3f}" for r in results) + " |")
    lines += ["", f"![curves]({png.name})", "", "## Memory and time (ratios are PPO / GRPO)", ""]
    lines += [
        "| | GRPO | PPO λ=0.95 | PPO λ=1.0 | ratio (λ=0.95) | ratio (λ=1.0) |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, get, fmt) -> None:
        vals = [get(results[r]) for r in RUNS]
        ratios = [f"{v / vals[0]:.2f}x" if vals[0] else "n/a (GRPO has none)" for v in vals[1:]]
        cells = [fmt(v) for v in vals] + ratios
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    sb = lambda key: lambda r: r["state_bytes"][key]  # noqa: E731
    row("policy parameters (MiB)", sb("policy_params"), _mb)
    row("reference parameters (MiB)", sb("reference_params"), _mb)
    row("value-model parameters (MiB)", sb("value_params"), _mb)
    row("gradients (MiB)", sb("gradients"), _mb)
    row("AdamW state (MiB)", sb("optimizer_state"), _mb)
    row("**training state, total (MiB)**", sb("total"), _mb)
    row("process peak RSS (MiB)", lambda r: r["peak_rss_bytes"], _mb)
    row("process peak RSS - RSS before the run (MiB)", lambda r: r["peak_rss_bytes"] - r["rss_before_run_bytes"], _mb)
    row("**mean step time (s)**", lambda r: r["step_s"], lambda v: f"{v:.2f}")
    row("median step time (s)", lambda r: r["step_s_median"], lambda v: f"{v:.2f}")
    row("  rollout (s)", lambda r: r["rollout_s"], lambda v: f"{v:.2f}")
    row("  inference: old/ref log-probs (+ values) (s)", lambda r: r["inference_s"], lambda v: f"{v:.2f}")
    row("  training: policy (+ value) steps (s)", lambda r: r["train_s"], lambda v: f"{v:.2f}")
    lines += [
        "",
        "Training state is counted exactly from the tensors (fp32): parameters, one gradient per trainable "
        "parameter (all exist between backward and the optimizer step), and the AdamW moments. Peak RSS is the "
        "whole process (`ru_maxrss`: PyTorch runtime, rollout engine copy, activations, allocator caches "
        "included); the rollout engine's own weight copy is "
        f"{_mb(g['state_bytes']['rollout_engine_weights'])} MiB in every run. Step times are over the steps "
        "without a held-out evaluation; the machine is shared, so single steps vary (the median is the steadier "
        "figure).",
        "",
        "## Reading",
        "",
        *_measured_summary(results),
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--num-eval", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_grpo_vs_ppo")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_vs_ppo.md")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)  # one run in this process
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the plot and markdown from the runs in --work-dir"
    )
    args = parser.parse_args()
    for name in ("steps", "sft_steps", "num_eval", "eval_every", "mini_batches"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    sft_dir = args.work_dir / "sft_model"
    if args.worker:
        result = run_one(args, args.worker, args.work_dir / args.worker, sft_dir)
        (args.work_dir / f"{args.worker}.json").write_text(json.dumps(result, indent=1))
        return

    t0 = time.perf_counter()
    passthrough = [a for a in sys.argv[1:] if a != "--report-only"]
    if args.report_only:
        saved = json.loads((args.work_dir / "results.json").read_text())
        sft, results = saved["sft"], saved["runs"]
        for run in RUNS:  # re-derive the curves and times from the logs (this script's current definitions)
            results[run].update(curves_and_times(args.work_dir / run))
        command = saved.get("command") or ("python benchmarks/bench_grpo_vs_ppo.py " + " ".join(passthrough)).strip()
    else:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        sft = cold_start(args, sft_dir)
        print(f"cold-start SFT: {sft['sft_steps']} steps, final CE {sft['final_ce']:.3f}, {sft['seconds']:.0f} s")
        results = {}
        for run in RUNS:  # back to back, each in its own process (its own peak RSS)
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, *passthrough, "--worker", run], check=True)
            results[run] = json.loads((args.work_dir / f"{run}.json").read_text())
            r = results[run]
            print(f"{run}: pass@1 {r['accuracy'][0][1]:.3f} -> {r['accuracy'][-1][1]:.3f}, step {r['step_s']:.2f} s, "
                  f"state {_mb(r['state_bytes']['total'])} MiB, peak RSS {_mb(r['peak_rss_bytes'])} MiB "
                  f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
        command = ("python benchmarks/bench_grpo_vs_ppo.py " + " ".join(passthrough)).strip()
        (args.work_dir / "results.json").write_text(
            json.dumps({"sft": sft, "runs": results, "command": command}, indent=1)
        )
    g = results["grpo"]
    for run in RUNS[1:]:
        r = results[run]
        print(f"{run} / grpo: training state {r['state_bytes']['total'] / g['state_bytes']['total']:.2f}x, "
              f"peak RSS {r['peak_rss_bytes'] / g['peak_rss_bytes']:.2f}x, step time {r['step_s'] / g['step_s']:.2f}x, "
              f"final pass@1 {r['accuracy'][-1][1]:.3f} vs {g['accuracy'][-1][1]:.3f}")  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    png = args.results.with_suffix(".png")
    plot(results, png)
    write_markdown(args, results, sft, args.results, png, command)
    print(f"wrote {args.results} and {png} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
