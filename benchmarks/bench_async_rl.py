"""Samples/s and held-out accuracy over wall time of the rollout modes (`rollout.mode`): sync against one_step_off and
async, on the demo task (configs/demo.yaml) or a real model's config (`--config configs/smollm2_math.yaml`), in one
run with the same settings.

On the demo task one cold-start SFT gives the starting policy (a real model's config starts from its checkpoint);
then each mode trains from those weights for the same number of GRPO steps, one mode after the other, with the same
loss (`grpo.old_logprobs=sampler`: the behaviour policy's log-probs as the old ones, which the off-policy modes need
and sync may use), sampling at temperature 1, with the same engine (`--backend`):

- sync: the trainer as it is by default, the engine in the trainer's process (`rollout.remote=false`);
- sync_remote: sync with the engine in a worker process (what the off-policy modes pay for the process split);
- one_step_off: step k+1's batch is sampled by the weights of step k while step k trains;
- async: `--max-staleness` batches sampled ahead;
- async_partial: async with partial rollouts (`rollout.partial_rollouts`: pushed weights loaded between segments).

Torch threads: the trainer and the worker get `--threads` each (1 each splits the 2 cores; `--worker-threads` sets
the worker's apart), the in-process sync trainer `--sync-threads`. samples/s counts the trained completions over the
GRPO steps' time without the held-out evaluations (timed apart), of which the trainer spent some getting its batch
(generating it in the sync modes, waiting for it in the others). With a sync_remote run the report gives the
perfect-overlap estimate: sync_remote's steps with generation and the rest fully overlapped, about the most an off-
policy mode reaches on the machine. The plot shows held-out pass@1 against wall time since the first step,
evaluations included. With `--seeds 0,1,2` every mode runs once per seed (the demo's cold start too), each compared
with sync of its seed, and a second table gives each mode's final accuracy over the seeds (`--include` adds the runs
of an earlier run's JSON with the same settings, e.g. other seeds or other modes; checked before anything runs).
Writes benchmarks/results/async_rl.md and async_rl.png (and the per-step records as JSON with `--json`).

    nice python benchmarks/bench_async_rl.py                 # 30 steps per mode, eval every 10
    nice python benchmarks/bench_async_rl.py --steps 4 --eval-every 2 --num-eval 20 --sft-steps 20   # quick
    nice python benchmarks/bench_async_rl.py --config configs/smollm2_math.yaml --backend vllm --steps 8 \
        --eval-every 8 --num-eval 48 --modes sync,one_step_off,async --out benchmarks/results/async_rl_smollm2.md

`main(argv)` returns the result as a dict.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import git_commit, machine, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sync", "sync_remote", "one_step_off", "async", "async_partial")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps per mode")
    parser.add_argument("--sft-steps", type=int, default=200, help="the shared cold-start SFT (the demo's: 200)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--num-eval", type=int, default=200, help="held-out problems (the demo's: 200)")
    parser.add_argument("--max-staleness", type=int, default=2, help="async's bound (and lookahead)")
    parser.add_argument(
        "--sync-warmup",
        type=int,
        default=0,
        help="the off-policy modes' rollout.sync_warmup_steps (their first steps sample synchronously)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the worker")
    parser.add_argument("--worker-threads", type=int, default=None, help="the worker's (default: --threads)")
    parser.add_argument("--sync-threads", type=int, default=1, help="torch threads of the in-process sync trainer")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="the run's config: the demo task (cold-start SFT first) or a real model's (model.path: "
                             "no SFT, e.g. configs/smollm2_math.yaml)")  # fmt: skip
    parser.add_argument("--backend", default="native", help="rollout.backend of every mode (native or vllm)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds; every mode runs once per seed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "async_rl.md")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--include", type=Path, action="append", default=[], metavar="JSON",
        help="an earlier run's --json (same settings) whose runs join the tables, but for the (mode, seed) pairs "
        "that this run makes",
    )  # fmt: skip
    return parser.parse_args(argv)


# what must agree for an earlier run's results to join this run's tables
_COMPARABLE = ("steps", "sft_steps", "eval_every", "num_eval", "max_staleness", "sync_warmup", "threads",
               "worker_threads", "sync_threads", "config", "backend", "set")  # fmt: skip
# settings added since: what a JSON from before them ran with
_DEFAULTS = {"sync_warmup": "0", "worker_threads": "None"}


def included_results(args: argparse.Namespace, modes: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """The runs in the `--include` files, after checking that their settings are this run's, but for the (mode,
    seed) pairs that this run makes (its own supersede them)."""
    import json

    results = []
    for path in args.include:
        earlier = json.loads(path.read_text())
        ours = {k: str(v) for k, v in vars(args).items()}
        differ = [k for k in _COMPARABLE if earlier["args"].get(k, _DEFAULTS.get(k)) != ours[k]]
        if differ:
            raise SystemExit(f"--include {path}: its settings differ from this run's in {', '.join(differ)}")
        for r in earlier["results"]:
            r = r if "seed" in r else dict(r, seed=int(earlier["args"]["seed"]))  # runs from before --seeds
            if r["mode"] in MODES and not (r["mode"] in modes and r["seed"] in seeds):
                results.append(r)
    return results


def _names_a_model(args: argparse.Namespace) -> bool:
    """Whether the config names a pretrained model (no cold start; held-out rows from its data files)."""
    from r1engine.trainer.config import load_config

    return load_config(args.config, args.set).model.path is not None


def _overrides(args: argparse.Namespace, out_dir: Path, seed: int) -> list[str]:
    eval_size = f"data.eval_size={args.num_eval}" if args.real_model else f"task.num_eval={args.num_eval}"
    return [
        f"output_dir={out_dir}",
        f"seed={seed}",
        "sft.steps=0",
        f"grpo.steps={args.steps}",
        "grpo.old_logprobs=sampler",
        "grpo.temperature=1.0",  # the off-policy modes' correction needs T=1 unfiltered sampling
        f"rollout.backend={args.backend}",
        eval_size,
        f"eval.every={args.eval_every}",
        "checkpoint.every=0",
        "checkpoint.resume=false",
        *args.set,
    ]


def _worker_threads(args: argparse.Namespace) -> int:
    return args.worker_threads if args.worker_threads is not None else args.threads


def _mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    threads = [f"training.num_threads={args.threads}", f"rollout.num_threads={_worker_threads(args)}"]
    off_policy = [*threads, f"rollout.sync_warmup_steps={args.sync_warmup}"]
    return {
        "sync": [f"training.num_threads={args.sync_threads}"],
        "sync_remote": ["rollout.remote=true", *threads],
        "one_step_off": ["rollout.mode=one_step_off", *off_policy],
        "async": ["rollout.mode=async", f"rollout.max_staleness={args.max_staleness}", *off_policy],
        "async_partial": [
            "rollout.mode=async",
            f"rollout.max_staleness={args.max_staleness}",
            "rollout.partial_rollouts=true",
            *off_policy,
        ],
    }[mode]


def cold_start(args: argparse.Namespace, work: Path, seed: int) -> Path | None:
    """The demo's cold-start SFT once; every mode starts from the weights it writes (None: a real model's config,
    whose modes start from its checkpoint)."""
    from r1engine.trainer.config import load_config
    from r1engine.trainer.grpo import GRPOTrainer

    if args.real_model:
        return None
    cfg = load_config(
        args.config,
        [
            f"output_dir={work / 'sft'}",
            f"seed={seed}",
            f"sft.steps={args.sft_steps}",
            "rollout.backend=native",
            f"training.num_threads={args.sync_threads}",
        ],
    )
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        trainer._cold_start()
        trainer.model.save_pretrained(work / "sft-model")
    finally:
        trainer.close()
    return work / "sft-model"


def run_mode(mode: str, args: argparse.Namespace, model_dir: Path, work: Path, seed: int) -> dict[str, Any]:
    """One mode's run from the SFT weights: its per-step records, evaluation time and wall time."""
    from r1engine.models import PolicyModel
    from r1engine.trainer.config import load_config
    from r1engine.trainer.grpo import GRPOTrainer
    from r1engine.trainer.metrics import read_metrics

    out_dir = work / f"{mode}-seed{seed}"
    cfg = load_config(args.config, [*_overrides(args, out_dir, seed), *_mode_overrides(mode, args)])
    model = PolicyModel.from_pretrained(model_dir) if model_dir is not None else None
    trainer = GRPOTrainer(cfg, model=model, progress=False)
    evals: list[float] = []
    evaluate = trainer.evaluate

    def timed_evaluate():
        t0 = time.perf_counter()
        try:
            return evaluate()
        finally:
            evals.append(time.perf_counter() - t0)

    trainer.evaluate = timed_evaluate
    t0 = time.perf_counter()
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    wall = time.perf_counter() - t0
    records = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    in_step_evals = iter(evals[1:])  # evals[0]: before RL, outside the steps; then in the order of the steps
    step_no_eval = [r["time/step_s"] - (next(in_step_evals) if "eval/accuracy" in r else 0.0) for r in steps]
    train_s = sum(step_no_eval)
    samples = len(steps) * cfg.grpo.prompts_per_step * cfg.grpo.group_size
    curve, clock = [(0.0, records[0]["eval/accuracy"])], 0.0
    for r in steps:
        clock += r["time/step_s"]
        if "eval/accuracy" in r:
            curve.append((clock, r["eval/accuracy"]))
    final = summary["accuracy_after_rl"]
    n = args.num_eval * cfg.eval.samples
    return {
        "mode": mode,
        "seed": seed,
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "eval_s": sum(evals),
        "wall_s": wall,
        "accuracy_before": summary["accuracy_before_rl"],
        "accuracy_after": final,
        "accuracy_se": math.sqrt(max(final * (1 - final), 1e-12) / n),  # over the samples (problems x samples)
        "staleness_mean": sum(r.get("rollout/staleness_mean") or 0.0 for r in steps) / len(steps),
        "dropped_stale": steps[-1].get("rollout/dropped_stale") or 0.0,
        "curve": curve,
        "step_s": [r["time/step_s"] for r in steps],
        # per step without its evaluation: all of it, and the part spent getting the batch (generating it in the sync
        # modes, waiting for the one sampled ahead in the others)
        "step_no_eval_s": step_no_eval,
        "batch_s": [r["time/rollout_s"] for r in steps],
    }


def overlap_estimate(results: list[dict[str, Any]]) -> list[str]:
    """About the most an overlap of generation with training reaches on this machine, per seed with a sync_remote
    run: sync_remote runs the off-policy modes' placement (trainer and worker processes, the same threads) with its
    two phases in turn, so overlapping them perfectly would make each step the longer of the two (the processes then
    share the memory bandwidth besides). Not a strict bound: the off-policy modes train on other samples, whose
    lengths, and so whose work, differ, and they push weights in the background while sync_remote waits for the
    worker to load them."""
    lines = []
    for run in results:
        if run["mode"] != "sync_remote" or "batch_s" not in run:  # runs from before these fields
            continue
        longer = sum(max(g, s - g) for g, s in zip(run["batch_s"], run["step_no_eval_s"], strict=True))
        estimate = run["samples"] / longer
        ratio = _vs_sync(results, dict(run, samples_per_s=estimate))
        generation = sum(run["batch_s"])
        lines.append(
            f"- Perfect-overlap estimate, seed {run['seed']}: sync_remote's steps with generation ({generation:.1f} s) "
            f"and the rest of the step ({run['train_s'] - generation:.1f} s) fully overlapped "
            f"would take {longer:.1f} s: {estimate:.2f} samples/s, {_ratio(ratio)} sync's, about the most an "
            "off-policy mode reaches with these threads on this machine (its samples, and so its work, differ)."
        )
    return lines


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    colors = {m: f"C{i}" for i, m in enumerate(modes)}
    styles = {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(seeds)}
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        label = f"{r['mode']} ({r['samples_per_s']:.1f} samples/s)"
        if len(seeds) > 1:
            label = f"{r['mode']}, seed {r['seed']} ({r['samples_per_s']:.1f} samples/s)"
        ax.plot(xs, ys, marker="o", color=colors[r["mode"]], linestyle=styles[r["seed"]], label=label)
    ax.set_xlabel("wall time since the first GRPO step (s, evaluations included)")
    ax.set_ylabel("held-out pass@1")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _vs_sync(results: list[dict[str, Any]], run: dict[str, Any]) -> float | None:
    """The run's samples/s over the sync run's of its seed (None when this run has none for that seed)."""
    sync = next((r for r in results if r["seed"] == run["seed"] and r["mode"] == "sync"), None)
    return run["samples_per_s"] / sync["samples_per_s"] if sync is not None else None


def _seconds(per_step: list[float] | None) -> str:
    return f"{sum(per_step):.1f}" if per_step is not None else "n/a (not recorded)"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a (no sync run)"


def across_seeds(results: list[dict[str, Any]]) -> list[str]:
    """Per mode over the seeds: mean samples/s ratio to the seed's sync, and final pass@1 as mean ± the standard
    error of that mean over the seeds (each seed's own standard error is over its samples only)."""
    lines = [
        "| mode | seeds | samples/s vs sync (mean) | final pass@1 per seed | mean ± s.e. over seeds |",
        "|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        finals = [r["accuracy_after"] for r in runs]
        mean = sum(finals) / len(finals)
        spread = "n/a (one seed)"
        if len(finals) > 1:
            spread = f"{math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1) / len(finals)):.3f}"
        ratios = [_vs_sync(results, r) for r in runs]
        ratio = sum(ratios) / len(ratios) if None not in ratios else None
        per_seed = ", ".join(f"{r['accuracy_after']:.3f} (seed {r['seed']})" for r in runs)
        lines.append(f"| {mode} | {len(runs)} | {_ratio(ratio)} | {per_seed} | {mean:.3f} ± {spread} |")
    return lines


def report(args: argparse.Namespace, results: list[dict[str, Any]], argv: list[str], load: tuple) -> str:
    rows = [
        f"| {r['mode']} | {r['seed']} | {r['samples_per_s']:.2f} | "
        f"{_ratio(_vs_sync(results, r))} | "
        f"{r['train_s']:.1f} | {_seconds(r.get('batch_s'))} | {r['wall_s']:.1f} | "
        f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} "
        f"(± {r['accuracy_se']:.3f}) | {r['staleness_mean']:.2f} | {r['dropped_stale']:.0f} |"
        for r in results
    ]
    multi_seed = len({r["seed"] for r in results}) > 1
    command = "python benchmarks/bench_async_rl.py " + " ".join(argv)
    return "\n".join(
        [
            "# Rollout modes: sync vs one_step_off vs async (issue 20)",
            "",
            f"Command: `nice {command.strip()}`; date {datetime.date.today()}; commit {git_commit()} (with the",
            f"working tree's changes); machine: {machine()}; load average before the run {load[0]:.2f}, "
            f"{load[1]:.2f}, {load[2]:.2f} and after it {os.getloadavg()[0]:.2f} (other jobs share the cores).",
            "",
            f"{_setting(args)}, then {args.steps} GRPO steps per mode "
            f"from the same weights (modes run one after the other), {args.backend} engine, grpo.old_logprobs=sampler, "
            f"held-out pass@1 over {args.num_eval} problems x 4 samples every {args.eval_every} steps; torch threads: "
            f"{args.threads} trainer + {_worker_threads(args)} worker, "
            f"{args.sync_threads} for in-process sync"
            + (
                f"; the off-policy modes' first {args.sync_warmup} steps synchronous (rollout.sync_warmup_steps)."
                if args.sync_warmup
                else "."
            ),
            "",
            "| mode | seed | samples/s | vs sync | GRPO s (no eval) | of which getting the batch | wall s "
            "| held-out pass@1 (± s.e.) | staleness mean | dropped stale |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *([*across_seeds(results), ""] if multi_seed else []),
            *([*estimates, ""] if (estimates := overlap_estimate(results)) else []),
            f"![held-out pass@1 over wall time]({args.out.with_suffix('.png').name})",
            "",
        ]
    )


def _setting(args: argparse.Namespace) -> str:
    path = Path(args.config).resolve()
    config = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if args.real_model:
        return f"Real model ({config})"
    return f"Demo task ({config}), {args.sft_steps} SFT steps once"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.real_model = _names_a_model(args)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {MODES}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    # refused here, not by the config of the first mode that uses them after the others have run
    counts = {"--sync-warmup": args.sync_warmup, "--threads": args.threads,
              "--worker-threads": _worker_threads(args), "--sync-threads": args.sync_threads}  # fmt: skip
    for flag, value in counts.items():
        if value < 0:
            raise SystemExit(f"{flag}: must be >= 0, got {value}")
    included = included_results(args, modes, seeds)  # refused before the runs, not after
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-async-rl-") as tmp:
        for seed in seeds:
            work = Path(tmp) / f"seed{seed}"
            model_dir = cold_start(args, work, seed)
            for mode in modes:
                results.append(run_mode(mode, args, model_dir, work, seed))
                r = results[-1]
                print(
                    f"{mode} seed {seed}: {r['samples_per_s']:.2f} samples/s, pass@1 {r['accuracy_after']:.3f}",
                    flush=True,
                )
    results = sorted(included + results, key=lambda r: (r["seed"], MODES.index(r["mode"])))
    text = report(args, results, argv, load)
    task = "real model" if args.real_model else "demo task"
    plot(results, args.out.with_suffix(".png"), f"{task}, {args.steps} GRPO steps per mode, {machine()}")
    write_report(text, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, args.out, args.json)
    return {"results": results}


if __name__ == "__main__":
    main()
