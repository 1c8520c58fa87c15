"""Fused operators with a backend switch (torch reference, C++ CPU, Triton, CUDA).

loss, metrics = r1engine.ops.grpo_loss(logits, targets, advantages, mask, old_logprobs, ref_logprobs, beta=0.001)
logp = r1engine.ops.token_logprobs(logits, targets, temperature=0.7)
"""

from __future__ import annotations

from r1engine.ops.grpo_loss import GRPOMetrics, grpo_loss, token_logprobs
from r1engine.ops.linear_grpo_loss import linear_grpo_loss

__all__ = ["GRPOMetrics", "grpo_loss", "linear_grpo_loss", "token_logprobs"]
