"""GRPO math in plain PyTorch (advantages, KL estimators, surrogate, aggregation): the oracle for fast paths.

Plain tensors in and out, usable alone by other trainers:

    adv = group_advantages(rewards, group_size=16)                     # [B * G], GRPO (r - mean) / (std + eps)
    w = aggregation_weights(mask, "seq-mean-token-mean")               # per-token weights of the aggregate
    loss, metrics = grpo_loss_reference(logits, targets, adv_seq, mask, old_logp, ref_logp, beta=0.001)
"""

from __future__ import annotations

from r1engine.algo.advantages import ADVANTAGE_METHODS, group_advantages, token_advantages
from r1engine.algo.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3
from r1engine.algo.loss import (
    AGGREGATIONS,
    GRPOMetrics,
    aggregation_weights,
    clipped_surrogate,
    grpo_loss_reference,
    grpo_metrics,
    masked_mean,
    token_logprobs,
)

__all__ = [
    "ADVANTAGE_METHODS",
    "AGGREGATIONS",
    "GRPOMetrics",
    "KL_ESTIMATORS",
    "aggregation_weights",
    "clipped_surrogate",
    "group_advantages",
    "grpo_loss_reference",
    "grpo_metrics",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "token_advantages",
    "token_logprobs",
]
