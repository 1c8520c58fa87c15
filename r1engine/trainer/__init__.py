"""The GRPO trainer: thin glue over the engine's pieces (rollout, rewards, packing, fused loss, optimizer).

    from r1engine.trainer import load_config, GRPOTrainer
    trainer = GRPOTrainer(load_config("configs/demo.yaml", ["grpo.steps=10"]))
    summary = trainer.run()

`grpo_train_step` (one optimizer step on a mini-batch of sequences) and `TrainEngine` (plain AdamW or DeepSpeed
ZeRO) are usable on their own. Imports are lazy so that `r1engine.trainer.config` stays light for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from r1engine.trainer.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from r1engine.trainer.engine import TrainEngine
    from r1engine.trainer.grpo import GRPOTrainer, grpo_train_step

__all__ = ["Config", "ConfigError", "GRPOTrainer", "TrainEngine", "grpo_train_step", "load_config"]


def __getattr__(name: str):
    if name in ("GRPOTrainer", "grpo_train_step"):
        from r1engine.trainer import grpo

        return getattr(grpo, name)
    if name == "TrainEngine":
        from r1engine.trainer.engine import TrainEngine

        return TrainEngine
    raise AttributeError(f"module 'r1engine.trainer' has no attribute {name!r}")
