"""The `r1engine` command line.

r1engine train --config configs/demo.yaml [key=value ...]   run the GRPO recipe of a config
r1engine config [--config FILE] [key=value ...]            print the resolved config (defaults + file + overrides)
r1engine info                                               backends and optional components on this machine
"""

from __future__ import annotations

import argparse
import json
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
    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    sub.add_parser("info", help="which backends (torch, cpp, triton, cuda) and components are available")
    args = parser.parse_args(argv)

    if args.command == "info":
        from r1engine.info import main as info_main

        info_main()
        return 0

    from r1engine.trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"r1engine: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from r1engine.trainer.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg, progress=not args.no_progress)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
