"""Reward models in the inference module: R1's model-based rewards for general prompts.

    from r1engine.reward_models import RewardScorer, PairwiseHelpfulness, PointwiseSafety

    helpful = PairwiseHelpfulness(RewardScorer.from_pretrained("runs/rm-helpful/model"), pairing="round_robin")
    rewards = helpful(prompts, groups)                  # rewards[g][i]: response i of prompt g, in [0, 1]
    future = helpful.submit(prompts, groups)            # the same on the scorer's thread, overlapping other work
    safety = PointwiseSafety(RewardScorer.from_pretrained("runs/rm-safety/model", device="cuda", offload=True))
    p_safe = safety(prompts, responses)

Modules: ``format`` (`RewardFormat`: how a model is used), ``model`` (`RewardModel`: a policy body plus a scalar or
classifier head), ``checkpoint`` (Hugging Face `*ForSequenceClassification` directories in and out), ``text`` (the final
summary after the reasoning, rendering with the reward model's own tokenizer), ``inference`` (`RewardScorer`: packed
batched scoring, device, offloading, a thread for asynchronous calls), ``scoring`` (pairwise helpfulness with the A/B
swap and the pairings, pointwise safety), ``routing`` (`rm:<name>` rewards in reward routes).
"""

from __future__ import annotations

from r1engine.reward_models.format import RewardFormat
from r1engine.reward_models.inference import RewardScorer, score_sequences
from r1engine.reward_models.model import RewardModel
from r1engine.reward_models.routing import RM_PREFIX, check_routes, rows_by_model
from r1engine.reward_models.scoring import PAIRINGS, PairwiseHelpfulness, PointwiseSafety, group_rewards
from r1engine.reward_models.text import final_summary

__all__ = [
    "PAIRINGS",
    "RM_PREFIX",
    "PairwiseHelpfulness",
    "PointwiseSafety",
    "RewardFormat",
    "RewardModel",
    "RewardScorer",
    "check_routes",
    "final_summary",
    "group_rewards",
    "rows_by_model",
    "score_sequences",
]
