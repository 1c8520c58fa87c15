"""Which way the trainer computes the policy loss from the final hidden states of the loss tokens
(`training.loss_path`).

* ``"logits"``: the lm_head writes the logits of the loss tokens ``[M, V]``, then ``r1engine.ops.grpo_loss`` with
  ``inplace_backward=True``: the logits gradient takes the logits' own buffer, and the token entropy (a metric, or
  the entropy bonus) comes from the loss's own vocabulary pass. One ``[M, V]`` tensor at the peak.
* ``"lm_head_fused"``: ``r1engine.ops.linear_grpo_loss`` on the hidden states and ``lm_head.weight``: the logits are
  never held whole (the Triton kernel on CUDA; on CPU chunks of fp32 logits, recomputed in the backward: a fixed
  working set of a few chunks, and one more logits GEMM than the logits path). It reads ``lm_head.weight`` outside
  the head's forward, which DeepSpeed ZeRO-3 partitions: not available under ZeRO-3.
* ``"auto"``: ``"logits"``, what ``benchmarks/bench_loss_path.py`` measured as the better default
  (``benchmarks/results/loss_path.md``): on CPU the fused path took well over the logits path's time at every size
  measured (it computes the logits twice, and its chunks cost more elementwise passes and head-gradient updates), and
  saved memory only once the logits are several times its working set. Memory-bound runs choose "lm_head_fused".
  No GPU measurement exists yet (the benchmark has a CUDA mode); "auto" makes no other choice on GPU.

Every path gives the same loss, metrics and gradients (``tests/test_trainer_loss_path.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from r1engine.algo.policy_loss import GRPOLossOutput, LossParams
from r1engine.ops import grpo_loss, linear_grpo_loss

__all__ = ["FUSED_HEAD_BACKENDS", "LOSS_PATHS", "head_policy_loss", "resolve_loss_path"]

LOSS_PATHS = ("auto", "logits", "lm_head_fused")
FUSED_HEAD_BACKENDS = ("auto", "torch", "triton")
"""The `training.loss_backend` values that `linear_grpo_loss` has (the lm_head-fused path's)."""


def resolve_loss_path(loss_path: str, *, zero_stage: int = 0, loss_backend: str = "auto") -> str:
    """The path ("logits" or "lm_head_fused") for a `training.loss_path` value; ValueError for a path that cannot run
    with these settings (ZeRO-3, or a loss backend the fused op does not have)."""
    if loss_path not in LOSS_PATHS:
        raise ValueError(f"loss_path: expected one of {', '.join(map(repr, LOSS_PATHS))}, got {loss_path!r}")
    if loss_path == "auto":
        return "logits"  # what the measurement chose (the module docstring)
    if loss_path == "lm_head_fused" and zero_stage == 3:
        raise ValueError(
            "loss_path: 'lm_head_fused' reads lm_head.weight outside the head's forward, which DeepSpeed ZeRO-3 "
            "partitions; use 'logits' (or 'auto') with ZeRO-3"
        )
    if loss_path == "lm_head_fused" and loss_backend not in FUSED_HEAD_BACKENDS:
        raise ValueError(
            f"loss_path: 'lm_head_fused' runs linear_grpo_loss, whose backends are "
            f"{', '.join(map(repr, FUSED_HEAD_BACKENDS))}; the loss backend is {loss_backend!r}"
        )
    return loss_path


def _zero3_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 marks the parameters it partitions


def head_policy_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    *,
    params: LossParams,
    sampler_logprobs: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    loss_path: str = "auto",
    loss_backend: str = "auto",
) -> GRPOLossOutput:
    """The GRPO-family loss of the loss tokens' final-normed hidden states ``hidden [M, H]`` through the lm_head
    module ``head`` (a bias-free linear layer with ``weight [V, H]``, tied to the embedding or not); per-token
    ``targets``, ``old``, ``ref``, ``sampler_logprobs`` ``[M]``, ``advantages`` ``[M]`` (or ``[S]`` with
    ``segment_ids``), all on ``hidden``'s device. ``loss_path``: a `training.loss_path` value (see the module
    docstring). Gradients reach ``hidden`` and ``head.weight``."""
    path = resolve_loss_path(
        loss_path, zero_stage=3 if _zero3_partitioned(head.weight) else 0, loss_backend=loss_backend
    )
    mask = torch.ones(targets.shape[0], device=hidden.device)
    kwargs = dict(params=params, sampler_logprobs=sampler_logprobs, segment_ids=segment_ids, backend=loss_backend)
    if path == "lm_head_fused":
        return linear_grpo_loss(hidden, head.weight, targets, advantages, mask, old, ref, **kwargs)
    # through the module call (ZeRO-3 gathers the weight around it); the gradient takes the logits' buffer
    return grpo_loss(head(hidden), targets, advantages, mask, old, ref, inplace_backward=True, **kwargs)
