"""The `r1engine` command line.

r1engine train --config configs/demo.yaml [key=value ...]   run the GRPO recipe of a config
r1engine train --nproc 2 --config ... training.deepspeed_zero_stage=2
                                                            the same on 2 data-parallel ranks (DeepSpeed ZeRO)
r1engine recipe configs/recipes/r1.yaml [key=value ...]    run a multi-stage recipe (R1-Zero, R1, distillation)
r1engine train-rm --config FILE [key=value ...]            train a reward model: pairwise helpfulness (Bradley-Terry)
                                                            or pointwise safety (r1engine/reward_models/config.py)
r1engine config [--config FILE] [key=value ...]            print the resolved config (defaults + file + overrides)
r1engine export CHECKPOINT OUT [--keep-mtp]                 a checkpoint as a plain Hugging Face directory
r1engine convert MODEL.gguf OUT                             a .gguf file as a Hugging Face safetensors directory
r1engine info                                               backends and optional components on this machine
r1engine rollout-worker --connect HOST:PORT [--model-dir D] a rollout worker for a trainer with rollout.listen=HOST:PORT
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
        "metrics.png and checkpoints into output_dir and resumes from the newest intact checkpoint there "
        "(checkpoint.resume=false starts over, moving a previous run's files into output_dir/previous-N/).",
    )
    _add_config_args(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    train.add_argument(
        "--vllm-logs",
        action="store_true",
        help="show vLLM's own log lines (errors only by default; the same as rollout.vllm_log_level=INFO)",
    )
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
    train_rm = sub.add_parser(
        "train-rm",
        help="train a reward model: pairwise helpfulness (Bradley-Terry) or pointwise safety (classifier)",
        description="Train a reward model from preference pairs (kind=pairwise) or safe/unsafe labels "
        "(kind=pointwise) in JSONL/parquet files, with the R1 paper's defaults (batch 256, lr 6e-6, one epoch, "
        "max length 8192); keys in r1engine/reward_models/config.py. Writes output_dir/model/ (a Hugging Face "
        "*ForSequenceClassification directory), metrics.jsonl and summary.json (held-out accuracy).",
    )
    train_rm.add_argument("--config", help="YAML config file (keys as in r1engine/reward_models/config.py)")
    train_rm.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. kind=pointwise training.lr=1e-5"
    )
    train_rm.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    sub.add_parser("info", help="which backends (torch, cpp, triton, cuda) and components are available")
    export = sub.add_parser(
        "export",
        help="write a checkpoint as a plain Hugging Face directory of its source architecture",
        description="Write the policy of CHECKPOINT (a checkpoint directory, its model/ directory, or a run's "
        "output_dir for its newest checkpoint) to OUT as a Hugging Face directory of the source architecture "
        "(LlamaForCausalLM for a Llama source, ...): its original config.json fields, generation_config.json and "
        "tokenizer files, no MTP layers unless --keep-mtp. transformers and vLLM load OUT as they load the source.",
    )
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--keep-mtp", action="store_true", help="keep the MTP layers (num_nextn_predict_layers)")
    convert = sub.add_parser(
        "convert",
        help="dequantize a .gguf file into a Hugging Face safetensors directory",
        description="Dequantize MODEL.gguf (through transformers and the gguf package) to float32 and write OUT: "
        "config.json, generation_config.json, model.safetensors and the tokenizer. model.path also takes a .gguf "
        "file directly (converted once into a cache).",
    )
    convert.add_argument("gguf_file")
    convert.add_argument("out")
    worker = sub.add_parser(
        "rollout-worker",
        help="serve rollouts for a trainer that listens (rollout.listen), from this or another machine",
        description="Connect to a trainer started with rollout.listen=HOST:PORT (rollout.mode one_step_off or async, "
        "or rollout.remote=true), build the rollout engine the trainer asks for, and serve its generations and "
        "weight updates until it closes. Set R1ENGINE_ROLLOUT_AUTHKEY to the same secret on both machines unless "
        "HOST is a loopback address (r1engine/rollout/external.py).",
    )
    worker.add_argument("--connect", required=True, metavar="HOST:PORT", help="the trainer's rollout.listen address")
    worker.add_argument("--model-dir", help="this machine's copy of the trainer's checkpoint (default: its path)")
    worker.add_argument("--device", help="the native engine's device here (default: the trainer's rollout.device)")
    worker.add_argument("--num-threads", type=int, help="intra-op CPU threads (default: the trainer's)")
    worker.add_argument("--connect-timeout", type=float, default=600.0, help="seconds to wait for the trainer")
    # Overrides may come before or after the flags (`train --config F k=v --no-progress k2=v2`): argparse stops
    # filling a positional list at the first flag, so the remaining key=value tokens are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "vllm_logs", False):
        args.overrides = [*args.overrides, "rollout.vllm_log_level=INFO"]

    if args.command == "info":
        from r1engine.info import main as info_main

        info_main()
        return 0

    if args.command in ("export", "convert"):
        try:
            out = _export(args.checkpoint, args.out, args.keep_mtp) if args.command == "export" else _convert(args)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"r1engine: {args.command} error: {exc}", file=sys.stderr)
            return 2
        print(out)
        return 0

    if args.command == "train-rm":
        return _train_rm(args)

    if args.command == "rollout-worker":
        return _rollout_worker(args)

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

    from r1engine.data import DataError, TemplateError
    from r1engine.trainer import create_trainer
    from r1engine.trainer.async_rollout import RolloutProcessLost
    from r1engine.trainer.checkpoint import CheckpointError

    try:
        trainer = create_trainer(cfg, progress=not args.no_progress)  # GRPO, or PPO for grpo.advantage=gae
    except ConfigError as exc:  # e.g. an output_dir that cannot be written, named in the message
        print(f"r1engine: config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, TemplateError) as exc:  # a data set that cannot be used, named in the message
        print(f"r1engine: data error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # a model or checkpoint that cannot be loaded, named in the message
        print(f"r1engine: model error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except CheckpointError as exc:  # a previous run in output_dir that cannot be resumed: says how to start over
        if trainer.is_main:
            print(f"r1engine: checkpoint error: {exc}", file=sys.stderr)
        return 2
    except RolloutProcessLost as exc:  # the rollout worker died: says which checkpoint a rerun resumes from
        print(f"r1engine: rollout error: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if trainer.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def _train_rm(args) -> int:
    """`r1engine train-rm`: errors of the config, the data and the model are one line on stderr, exit code 2."""
    from r1engine.data import DataError
    from r1engine.reward_models.config import ConfigError, load_rm_config
    from r1engine.reward_models.train import RewardModelTrainer

    try:
        cfg = load_rm_config(args.config, args.overrides)
        trainer = RewardModelTrainer(cfg, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"r1engine: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"r1engine: data error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, ImportError) as exc:  # a model or tokenizer that cannot be used
        print(f"r1engine: model error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(trainer.run(), indent=2))
    return 0


def _model_dir_of(checkpoint: str):
    """The model directory of a checkpoint directory, of its model/ directory, or of a run's newest checkpoint."""
    from pathlib import Path

    from r1engine.trainer.checkpoint import CheckpointManager

    root = Path(checkpoint)
    for candidate in (root, root / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    latest = CheckpointManager(root).latest()
    if latest is not None:
        return latest / "model"
    raise FileNotFoundError(f"CHECKPOINT: {checkpoint!r} is not a model directory, a checkpoint or a run directory")


def _export(checkpoint: str, out: str, keep_mtp: bool) -> str:
    from r1engine.models import PolicyModel
    from r1engine.models.tokenizer import TOKENIZER_FILES, load_tokenizer

    source = _model_dir_of(checkpoint)
    model = PolicyModel.from_pretrained(source)
    tokenizer = (
        load_tokenizer(source, key="CHECKPOINT") if any((source / f).is_file() for f in TOKENIZER_FILES) else None
    )
    model.export_pretrained(out, tokenizer, keep_mtp=keep_mtp)
    return out


def _convert(args) -> str:
    from r1engine.models.gguf import convert_gguf

    return str(convert_gguf(args.gguf_file, args.out, key="MODEL.gguf"))


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


def _rollout_worker(args: argparse.Namespace) -> int:
    from r1engine.rollout.external import serve

    if args.num_threads is not None and args.num_threads < 1:
        print(f"r1engine: rollout-worker error: --num-threads: must be >= 1, got {args.num_threads}", file=sys.stderr)
        return 2
    try:
        serve(args.connect, model_dir=args.model_dir, device=args.device, num_threads=args.num_threads,
              timeout_s=args.connect_timeout)  # fmt: skip
    except (ValueError, TimeoutError, ConnectionError, OSError) as exc:
        print(f"r1engine: rollout-worker error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
