"""Fused operators with a backend switch (torch reference, C++ CPU, Triton, CUDA).

loss, metrics = r1engine.ops.grpo_loss(logits, targets, advantages, mask, old_logprobs, ref_logprobs, beta=0.001)
logp = r1engine.ops.token_logprobs(logits, targets, temperature=0.7)
y = r1engine.ops.rms_norm(x, weight, eps);  h = r1engine.ops.swiglu(gate, up);  q = r1engine.ops.rope(q, cos, sin)
"""

from __future__ import annotations

from r1engine.ops.grpo_loss import GRPOMetrics, grpo_loss, token_logprobs
from r1engine.ops.linear_grpo_loss import linear_grpo_loss
from r1engine.ops.rms_norm import rms_norm
from r1engine.ops.rope import rope
from r1engine.ops.swiglu import swiglu

__all__ = ["GRPOMetrics", "grpo_loss", "linear_grpo_loss", "rms_norm", "rope", "swiglu", "token_logprobs"]
