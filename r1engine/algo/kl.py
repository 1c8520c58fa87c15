"""Schulman's KL estimators between the policy and the reference policy, per token, from log-probabilities.

With ``d = ref_logp - logp`` (log of ref/pi for a token sampled from pi):

* k1 = ``-d`` = ``logp - ref_logp`` (unbiased, high variance, can be negative);
* k2 = ``0.5 * d**2`` (biased, low variance);
* k3 = ``exp(d) - d - 1`` = ``ref/pi - log(ref/pi) - 1`` (unbiased, >= 0; the one DeepSeek-R1's GRPO uses).
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimator_id", "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "kl_estimate_grad"]

KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}


def kl_estimator_id(name: str | int) -> int:
    """Map ``"k1" | "k2" | "k3"`` (or 1, 2, 3) to the integer id used by the fused kernels."""
    if isinstance(name, int) and not isinstance(name, bool) and name in (1, 2, 3):
        return name
    if isinstance(name, str) and name in KL_ESTIMATORS:
        return KL_ESTIMATORS[name]
    raise ValueError(f"kl_estimator: expected one of {sorted(KL_ESTIMATORS)}, got {name!r}")


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (ref_logp - logp)^2."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str | int = "k3") -> torch.Tensor:
    """The chosen estimator (``"k1" | "k2" | "k3"`` or 1/2/3), elementwise; differentiable in both inputs."""
    k = kl_estimator_id(estimator)
    return (kl_k1, kl_k2, kl_k3)[k - 1](logp, ref_logp)


def kl_estimate_grad(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str | int = "k3") -> torch.Tensor:
    """Analytic d(estimate)/d(logp): k1 -> 1, k2 -> logp - ref_logp, k3 -> 1 - exp(ref_logp - logp)."""
    k = kl_estimator_id(estimator)
    if k == 1:
        return torch.ones_like(logp)
    if k == 2:
        return logp - ref_logp
    return 1 - torch.exp(ref_logp - logp)
