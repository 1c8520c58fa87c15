"""Reward models in the inference module: R1's model-based rewards for general prompts.

    from r1engine.reward_models import RewardScorer, PairwiseHelpfulness, PointwiseSafety

    helpful = PairwiseHelpfulness(RewardScorer.from_pretrained("runs/rm-helpful/model"), pairing="round_robin")
    rewards = helpful(prompts, groups)                  # rewards[g][i]: response i of prompt g, in [0, 1]
    future = helpful.submit(prompts, groups)            # the same on the scorer's thread, overlapping other work
    safety = PointwiseSafety(RewardScorer.from_pretrained("runs/rm-safety/model", device="cuda", offload=True))
    p_safe = safety(prompts, responses)
    judged = GenerativeHelpfulness(GenerativeJudge.from_pretrained("models/SmolLM2-135M-Instruct"))  # no trained RM

Modules: ``format`` (`RewardFormat`: how a model is used), ``model`` (`RewardModel`: a policy body plus a scalar or
classifier head), ``checkpoint`` (Hugging Face `*ForSequenceClassification` directories in and out), ``text`` (the final
summary after the reasoning, rendering with the reward model's own tokenizer), ``inference`` (`RewardScorer`: packed
batched scoring, device, offloading, a thread for asynchronous calls), ``scoring`` (pairwise helpfulness with the A/B
swap and the pairings, pointwise safety), ``generative`` (a causal LM as the pairwise judge, LLM-as-a-judge),
``routing`` (`rm:<name>` rewards in reward routes), ``data`` (preference and label files, length balancing), ``config``
and ``train`` (`r1engine train-rm`), ``synthetic`` (data with a hidden rule, for tests). The training pieces import
lazily, so that scoring does not load the training configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from r1engine.reward_models.format import RewardFormat
from r1engine.reward_models.generative import GenerativeHelpfulness, GenerativeJudge
from r1engine.reward_models.inference import RewardScorer, score_sequences
from r1engine.reward_models.model import RewardModel
from r1engine.reward_models.routing import RM_PREFIX, check_routes, rows_by_model
from r1engine.reward_models.scoring import PAIRINGS, PairwiseHelpfulness, PointwiseSafety, group_rewards
from r1engine.reward_models.text import final_summary

if TYPE_CHECKING:
    from r1engine.reward_models.config import RMConfig, load_rm_config
    from r1engine.reward_models.train import train_reward_model

__all__ = [
    "PAIRINGS",
    "RM_PREFIX",
    "GenerativeHelpfulness",
    "GenerativeJudge",
    "PairwiseHelpfulness",
    "PointwiseSafety",
    "RMConfig",
    "RewardFormat",
    "RewardModel",
    "RewardScorer",
    "check_routes",
    "final_summary",
    "group_rewards",
    "load_rm_config",
    "rows_by_model",
    "score_sequences",
    "train_reward_model",
]


def __getattr__(name: str):
    if name in ("RMConfig", "load_rm_config"):
        from r1engine.reward_models import config

        return getattr(config, name)
    if name == "train_reward_model":
        from r1engine.reward_models.train import train_reward_model

        return train_reward_model
    raise AttributeError(f"module 'r1engine.reward_models' has no attribute {name!r}")
