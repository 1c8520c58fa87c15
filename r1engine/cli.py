"""The `r1engine` command line.

r1engine train --config configs/demo.yaml [key=value ...]   run the GRPO recipe of a config
r1engine train --nproc 2 --config ... training.deepspeed_zero_stage=2
                                                            the same on 2 data-parallel ranks (DeepSpeed ZeRO)
r1engine recipe configs/recipes/r1.yaml [key=value ...]    run a multi-stage recipe (R1-Zero, R1, distillation)
r1engine config [--config FILE] [key=value ...]            print the resolved config (defaults + file + overrides)
r1engine info                                               backends and optional components on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (keys as in r1engine/trainer/config.py); defaults otherwise")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. grpo.steps=10 rollout.backend=native"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="r1engine",
        description="r1engine: custom-kernel GRPO training for DeepSeek-R1-style RL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a training config: cold-start SFT, then GRPO with rule-based rewards",
        description="Cold-start SFT (sft.steps > 0), then GRPO: rollouts (vLLM or native, MTP speculation), "
        "asynchronous rewards, packed training with the fused loss, weight sync. Writes metrics.jsonl, "
        "metrics.png and checkpoints into output_dir and resumes from the newest checkpoint there.",
    )
    _add_config_args(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel ranks on this machine (started with torch.distributed.run; needs a DeepSpeed ZeRO "
        "stage, training.deepspeed_zero_stage=1-3). Multi-node: start `python -m r1engine.cli train` with torchrun",
    )
    recipe = sub.add_parser(
        "recipe",
        help="run a multi-stage recipe: R1-Zero, R1 (SFT -> RL -> rejection sampling -> SFT -> RL), distillation",
        description="Run the stages of a recipe file in order (see r1engine/recipes.py and configs/recipes/); each "
        "stage writes <output_dir>/<stage>/ (model/ or traces.jsonl, stage.json) and finished stages are skipped "
        "when the recipe runs again. Writes summary.md and summary.png (held-out accuracy after each stage).",
    )
    recipe.add_argument("recipe", help="recipe YAML file")
    recipe.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="output_dir=DIR, stages.<name>.<key>=value for one stage, any other dotted config key for every stage",
    )  # fmt: skip
    recipe.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    sub.add_parser("info", help="which backends (torch, cpp, triton, cuda) and components are available")
    # Overrides may come before or after the flags (`train --config F k=v --no-progress k2=v2`): argparse stops
    # filling a positional list at the first flag, so the remaining key=value tokens are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    if args.command == "info":
        from r1engine.info import main as info_main

        info_main()
        return 0

    from r1engine.trainer.config import ConfigError, load_config

    if args.command == "recipe":
        from r1engine.recipes import RecipeRunner, load_recipe

        try:
            plan = load_recipe(args.recipe, args.overrides)
        except ConfigError as exc:
            print(f"r1engine: recipe error: {exc}", file=sys.stderr)
            return 2
        records = RecipeRunner(plan, progress=not args.no_progress).run()
        print((plan.output_dir / "summary.md").read_text(), end="")
        print(json.dumps({"output_dir": str(plan.output_dir), "stages": [r["name"] for r in records]}))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"r1engine: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.nproc < 1:
        print(f"r1engine: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" not in os.environ:
        if cfg.training.deepspeed_zero_stage == 0:
            print(
                "r1engine: config error: training.deepspeed_zero_stage: --nproc > 1 trains through DeepSpeed; "
                "set a ZeRO stage (1-3)",
                file=sys.stderr,
            )
            return 2
        return _launch(args.nproc, argv if argv is not None else sys.argv[1:])

    from r1engine.trainer.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg, progress=not args.no_progress)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command on `nproc` local ranks under torch.distributed.run (each rank sees RANK/WORLD_SIZE)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank_argv, skip = [], False  # the ranks run the same command without --nproc
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        rank_argv.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "r1engine.cli", *rank_argv]  # fmt: skip
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
