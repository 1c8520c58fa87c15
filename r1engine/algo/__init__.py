"""GRPO math in plain PyTorch (advantages, KL estimators, surrogate, aggregation): the oracle for fast paths.

Plain tensors in and out, usable alone by other trainers:

    adv = group_advantages(rewards, group_size=16)                     # [B * G], GRPO (r - mean) / (std + eps)
    adv = compute_advantages("rloo", AdvantageInputs(rewards, group_size=16)).advantages  # any registered estimator
    w = aggregation_weights(mask, "seq-mean-token-mean")               # per-token weights of the aggregate
    loss, metrics = grpo_loss_reference(logits, targets, adv_seq, mask, old_logp, ref_logp, beta=0.001)
    params = LossParams(policy_loss="cispo", beta=0.001, kl_estimator="low_var_kl")  # one object for every layer
"""

from __future__ import annotations

from r1engine.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    compute_advantages,
    group_advantages,
    register_advantage_estimator,
    token_advantages,
)
from r1engine.algo.aggregation import AGGREGATIONS, aggregation_weights, masked_mean
from r1engine.algo.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3, register_kl_estimator
from r1engine.algo.loss import grpo_loss_reference, token_entropy, token_logprobs
from r1engine.algo.policy_loss import (
    POLICY_LOSSES,
    GRPOLossOutput,
    GRPOMetrics,
    LossParams,
    clipped_surrogate,
    policy_loss,
    register_policy_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "AdvantageInputs",
    "AdvantageOutput",
    "GRPOLossOutput",
    "GRPOMetrics",
    "KL_ESTIMATORS",
    "LossParams",
    "POLICY_LOSSES",
    "aggregation_weights",
    "clipped_surrogate",
    "compute_advantages",
    "group_advantages",
    "grpo_loss_reference",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "policy_loss",
    "register_advantage_estimator",
    "register_kl_estimator",
    "register_policy_loss",
    "token_advantages",
    "token_entropy",
    "token_logprobs",
]
