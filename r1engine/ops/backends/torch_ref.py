"""Pure-PyTorch backend of the fused GRPO-loss contract: the oracle that every fast backend is tested against.

It implements the three contract functions on 2-D logits ``[N, V]`` (fp32 or bf16) with all math in fp32:

* :func:`token_logprobs_fwd` -> ``(logp, lse)``;
* :func:`grpo_fwd` -> ``(loss_tok, logp, lse, dlogp, ratio, kl, clipped)`` with the analytic ``dlogp``;
* :func:`logprobs_bwd` -> ``grad_logits = (onehot - softmax) * dlogp / T`` in the logits' dtype.

It favours clarity over memory (it materializes fp32 copies of the logits).
"""

from __future__ import annotations

import torch

from r1engine.algo.kl import kl_estimate, kl_estimate_grad

__all__ = ["token_logprobs_fwd", "grpo_fwd", "logprobs_bwd", "grpo_token_terms"]


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``lse = logsumexp(logits / T)`` and ``logp = logits[target] / T - lse`` (fp32 ``[N]`` each)."""
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    logp = scaled.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    return logp, lse


def grpo_token_terms(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    beta: float,
    kl_estimator: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO terms from ``logp``: ``(loss_tok, dlogp, ratio, kl, clipped)``, all fp32 ``[N]``.

    ``dlogp`` is the analytic derivative of ``loss_tok`` w.r.t. ``logp`` (zero where a clip is active). Rows with
    ``weights == 0`` get zeros (ratio 1), matching the fused kernels, which skip them.
    """
    logp = logp.float()
    adv = advantages.float()
    ratio = torch.exp(logp - old_logp.float()) if old_logp is not None else torch.ones_like(logp)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clip = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    s = torch.where(clip, ratio.clamp(lo, hi) * adv, ratio * adv)
    ds = torch.where(clip, torch.zeros_like(adv), adv * ratio)
    if dual_clip > 1.0:
        dual = (adv < 0) & (ratio > dual_clip)
        s = torch.where(dual, dual_clip * adv, s)
        ds = torch.where(dual, torch.zeros_like(ds), ds)
        clip = clip | dual
    if ref_logp is not None and beta != 0.0:
        kl = kl_estimate(logp, ref_logp.float(), kl_estimator)
        dkl = kl_estimate_grad(logp, ref_logp.float(), kl_estimator)
    else:
        kl = torch.zeros_like(logp)
        dkl = torch.zeros_like(logp)
    w = weights.float()
    live = w != 0
    zero = torch.zeros_like(logp)
    loss_tok = torch.where(live, w * (-s + beta * kl), zero)
    dlogp = torch.where(live, w * (-ds + beta * dkl), zero)
    ratio = torch.where(live, ratio, torch.ones_like(ratio))
    kl = torch.where(live, kl, zero)
    clipped = torch.where(live & clip, torch.ones_like(logp), zero)
    return loss_tok, dlogp, ratio, kl, clipped


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
    """Fused-contract forward: ``(loss_tok, logp, lse, dlogp, ratio, kl, clipped)``; rows with weight 0 are all 0."""
    logp, lse = token_logprobs_fwd(logits, targets, temperature)
    loss_tok, dlogp, ratio, kl, clipped = grpo_token_terms(
        logp,
        advantages,
        old_logp,
        ref_logp,
        weights,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        beta=beta,
        kl_estimator=kl_estimator,
    )
    live = weights != 0
    logp = torch.where(live, logp, torch.zeros_like(logp))
    lse = torch.where(live, lse, torch.zeros_like(lse))
    return loss_tok, logp, lse, dlogp, ratio, kl, clipped


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float,
    inplace: bool,
) -> torch.Tensor:
    """``grad[i, v] = (onehot(t_i)[v] - exp(logits[i, v] / T - lse_i)) * dlogp_i / T`` in the logits' dtype.

    With ``inplace=True`` the result is written into ``logits`` and that tensor is returned.
    """
    g = (dlogp.float() / temperature).unsqueeze(-1)
    p = torch.exp(logits.float() / temperature - lse.float().unsqueeze(-1))
    grad = -p * g
    grad.scatter_add_(-1, targets.long().unsqueeze(-1), g)
    grad = torch.where(g == 0, torch.zeros_like(grad), grad)  # rows with dlogp == 0 are exact zeros
    if inplace:
        logits.copy_(grad)
        return logits
    return grad.to(logits.dtype)
