"""KL estimators between the policy and the reference policy, per token, from log-probabilities.

With ``d = ref_logp - logp`` (log of ref/pi for a token sampled from pi), Schulman's estimators:

* k1 = ``-d`` = ``logp - ref_logp`` (unbiased, high variance, can be negative);
* k2 = ``0.5 * d**2`` (biased, low variance);
* k3 = ``exp(d) - d - 1`` = ``ref/pi - log(ref/pi) - 1`` (unbiased, >= 0; the one DeepSeek-R1's GRPO uses);

and verl's ``low_var_kl``: k3 with ``d`` clamped to [-20, 20] and the estimate to [-10, 10] (no gradient where a
clamp is active), which keeps a few very off-reference tokens from dominating the penalty.

Each is registered by name (``register_kl_estimator``); every loss path reads them from :data:`KL_ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1engine.algo.registry import Registry

__all__ = ["KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3", "kl_low_var", "kl_estimate", "register_kl_estimator"]

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl_estimator")
register_kl_estimator = KL_ESTIMATORS.register
"""Register ``fn(logp, ref_logp) -> estimate`` (elementwise, differentiable in ``logp``) under a name."""


@register_kl_estimator("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp."""
    return logp - ref_logp


@register_kl_estimator("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (ref_logp - logp)^2."""
    return 0.5 * (ref_logp - logp) ** 2


@register_kl_estimator("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@register_kl_estimator("low_var_kl")
def kl_low_var(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl's low_var_kl: k3 of the log-ratio clamped to [-20, 20], the estimate clamped to [-10, 10]."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """The estimator registered as ``estimator``, elementwise; differentiable in both inputs."""
    return KL_ESTIMATORS.lookup(estimator)(logp, ref_logp)
