"""The GRPO trainer: thin glue over the engine's pieces (rollout, rewards, packing, fused loss, optimizer).

    from r1engine.trainer import load_config, create_trainer
    trainer = create_trainer(load_config("configs/demo.yaml", ["grpo.steps=10"]))   # a GRPOTrainer
    summary = trainer.run()

`create_trainer` builds the trainer the config's advantage estimator needs: `GRPOTrainer`, or the PPO trainer
(`r1engine.trainer.ppo.PPOTrainer`, a value model) for an estimator that needs values (`grpo.advantage=gae`).

`grpo_train_step` (one optimizer step on a mini-batch of sequences) and `TrainEngine` (plain AdamW or DeepSpeed
ZeRO) are usable on their own. Imports are lazy so that `r1engine.trainer.config` stays light for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r1engine.trainer.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from r1engine.trainer.engine import TrainEngine
    from r1engine.trainer.grpo import GRPOTrainer, grpo_train_step

__all__ = ["Config", "ConfigError", "GRPOTrainer", "TrainEngine", "create_trainer", "grpo_train_step", "load_config"]


def create_trainer(cfg: Config, **kwargs: Any) -> GRPOTrainer:
    """The trainer for `cfg`: `GRPOTrainer(cfg, **kwargs)`, or `PPOTrainer(cfg, **kwargs)` when `grpo.advantage` is
    an estimator that needs a value model (r1engine.algo.ADVANTAGE_ESTIMATORS' `needs_values`)."""
    from r1engine.algo.advantages import advantage_estimator

    if advantage_estimator(cfg.grpo.advantage, key="grpo.advantage").needs_values:
        from r1engine.trainer.ppo import PPOTrainer

        return PPOTrainer(cfg, **kwargs)
    from r1engine.trainer.grpo import GRPOTrainer

    return GRPOTrainer(cfg, **kwargs)


def __getattr__(name: str):
    if name in ("GRPOTrainer", "grpo_train_step"):
        from r1engine.trainer import grpo

        return getattr(grpo, name)
    if name == "TrainEngine":
        from r1engine.trainer.engine import TrainEngine

        return TrainEngine
    raise AttributeError(f"module 'r1engine.trainer' has no attribute {name!r}")
