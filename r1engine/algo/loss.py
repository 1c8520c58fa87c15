"""The GRPO-family loss on materialised logits, in plain PyTorch: the readable reference of the fused operators.

``grpo_loss_reference`` takes ``log_softmax`` of the whole ``[..., V]`` logits in fp32 (and, when asked, the
entropies from the same softmax), then the one implementation of the loss math,
:func:`r1engine.algo.policy_loss.policy_loss`; autograd does the backward. The fused operators
(``r1engine.ops.grpo_loss``, ``r1engine.ops.linear_grpo_loss``) replace only the vocabulary pass, and are tested
against this. With the default :class:`~r1engine.algo.policy_loss.LossParams`, per token t of sequence i, with
``ratio = exp(logp - old_logp)``::

    s_t    = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)      (PPO clip, asymmetric)
    s_t    = max(s_t, dual_clip * A)   if A < 0 and dual-clip is on             (dual-clip, dual_clip > 1)
    loss   = sum_t weight_t * (-s_t + beta * KL_t)

where ``weight`` encodes the aggregation (see :func:`~r1engine.algo.aggregation.aggregation_weights`).
``old_logprobs=None`` means an on-policy step: ``old := logp.detach()`` (ratio 1, gradient ``-A``).
"""

from __future__ import annotations

from typing import Any

import torch

from r1engine.algo.aggregation import (
    ADVANTAGE_LAYOUTS,
    AGGREGATIONS,
    aggregation_weights,
    loss_share,
    masked_mean,
    sequences_with_gradient,
    token_advantages,
)
from r1engine.algo.policy_loss import (
    GRPOLossOutput,
    GRPOMetrics,
    LossParams,
    clipped_surrogate,
    policy_loss,
    prepare_loss_inputs,
)

__all__ = [
    "ADVANTAGE_LAYOUTS",
    "AGGREGATIONS",
    "GRPOMetrics",
    "aggregation_weights",
    "clipped_surrogate",
    "grpo_loss_reference",
    "loss_share",
    "masked_mean",
    "sequences_with_gradient",
    "token_advantages",
    "token_entropy",
    "token_logprobs",
]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` per token in fp32 (reference: materializes an fp32 log-softmax)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / T)`` per token in fp32 (materializes the softmax)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    # p log p is 0 where p is 0: log p taken as 0 there (exp(0) * 0 = 0), so neither value nor gradient is NaN
    safe = torch.where(logp == float("-inf"), torch.zeros_like(logp), logp)
    return -(safe.exp() * safe).sum(-1)


def grpo_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    params: LossParams | None = None,
    sampler_logprobs: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    advantages_per: str | None = None,
    **loss_settings: Any,
) -> GRPOLossOutput:
    """The loss and its metrics in plain autograd-able PyTorch (same arguments as ``r1engine.ops.grpo_loss``).

    ``logits [B, T, V]`` with ``targets/mask/old/ref/sampler [B, T]`` and ``advantages [B]`` or ``[B, T]``; or
    packed ``logits [N, V]`` with per-token ``[N]`` tensors, ``advantages [N]`` (or ``[S]`` with ``segment_ids``;
    ``advantages_per`` says which where the shape cannot, see :func:`token_advantages`). ``params`` (a
    :class:`~r1engine.algo.policy_loss.LossParams`) holds the loss settings; keyword ``loss_settings`` override its
    fields (``eps_high=0.28``, ``beta=0.001``, ...).
    """
    p = LossParams.build(params, **loss_settings)
    inputs = prepare_loss_inputs(
        tuple(logits.shape[:-1]), logits.device, advantages, mask, p,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, sampler_logprobs=sampler_logprobs,
        segment_ids=segment_ids, advantages_per=advantages_per,
    )  # fmt: skip
    logp = token_logprobs(logits, targets, p.temperature).reshape(-1)
    entropy = token_entropy(logits, p.temperature).reshape(-1) if p.needs_entropy else None
    return policy_loss(logp, inputs, p, entropy)
