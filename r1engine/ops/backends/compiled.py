"""Compiled backend of the fused GRPO-loss contract: calls ``torch.ops.r1engine.*``.

The same operators dispatch by device: the C++ CPU kernel (``csrc/core/grpo_loss.cpp``, backend ``"cpp"``) for
CPU tensors and the CUDA kernel (``csrc/cuda/grpo_loss.cu``, backend ``"cuda"``) for CUDA tensors.
"""

from __future__ import annotations

import torch

from r1engine import _ext

__all__ = ["token_logprobs_fwd", "grpo_fwd", "logprobs_bwd", "available"]


def available() -> bool:
    """True when the compiled extension provides the fused GRPO-loss operators."""
    return _ext.has_op("grpo_fwd")


def _float_vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(logp, lse)`` in fp32 from ``logits [N, V]`` and int64 ``targets [N]``."""
    _ext.require("token_logprobs_fwd")
    return torch.ops.r1engine.token_logprobs_fwd(logits, targets.long().contiguous(), float(temperature))


def grpo_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    beta: float,
    kl_estimator: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(loss_tok, logp, lse, dlogp, ratio, kl, clipped)`` (fp32 ``[N]`` each)."""
    _ext.require("grpo_fwd")
    return torch.ops.r1engine.grpo_fwd(
        logits,
        targets.long().contiguous(),
        _float_vec(advantages),
        _float_vec(old_logp),
        _float_vec(ref_logp),
        _float_vec(weights),
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip),
        float(beta),
        int(kl_estimator),
    )


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float,
    inplace: bool,
) -> torch.Tensor:
    """``(onehot - softmax) * dlogp / T`` in the logits' dtype; written into ``logits`` when ``inplace``."""
    targets = targets.long().contiguous()
    if inplace:
        _ext.require("logprobs_bwd_")
        torch.ops.r1engine.logprobs_bwd_(logits, targets, _float_vec(lse), _float_vec(dlogp), float(temperature))
        return logits
    _ext.require("logprobs_bwd")
    return torch.ops.r1engine.logprobs_bwd(logits, targets, _float_vec(lse), _float_vec(dlogp), float(temperature))
