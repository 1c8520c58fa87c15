"""Pure-PyTorch backend of the vocabulary-pass contract: the oracle that every fast backend is tested against.

It implements the two contract functions on 2-D logits ``[N, V]`` (fp32 or bf16) with all math in fp32:

* :func:`logprobs_fwd` -> ``(logp, lse, entropy)`` per row: ``lse = logsumexp(z)``, ``logp = z[target] - lse`` and
  (when asked) ``entropy = -sum_v p_v log p_v``, with ``z = logits / T`` and ``p = softmax(z)``; rows that are not
  ``live`` are all 0 (the fused kernels skip them);
* :func:`logprobs_bwd` -> ``grad_logits = ((onehot - p) * dlogp - dentropy * p * (log p + entropy)) / T`` in the
  logits' dtype: the gradient of ``sum_i dlogp_i * logp_i + dentropy_i * entropy_i``.

The loss math on these per-token results is the same for every backend (``r1engine.algo.policy_loss``). This
module favours clarity over memory (it materializes fp32 copies of the logits).
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_fwd", "logprobs_bwd"]


def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    live: torch.Tensor | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy)``, fp32 ``[N]`` each (entropy all 0 unless asked); rows with ``live == 0`` are 0."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    if entropy:
        logsm = z - lse.unsqueeze(-1)
        # p * log p is 0 where p is 0 (a -inf logit), not NaN
        plogp = torch.where(logsm == float("-inf"), torch.zeros_like(logsm), logsm.exp() * logsm)
        ent = -plogp.sum(-1)
    else:
        ent = torch.zeros_like(lse)
    if live is not None:
        keep = live != 0
        logp, lse, ent = (torch.where(keep, t, torch.zeros_like(t)) for t in (logp, lse, ent))
    return logp, lse, ent


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float,
    inplace: bool,
    dentropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient w.r.t. ``logits`` (see the module docstring) in the logits' dtype; rows whose ``dlogp`` and
    ``dentropy`` are 0 are exact zeros. With ``inplace=True`` it is written into ``logits``, which is returned."""
    inv_t = 1.0 / temperature
    logsm = logits.float() * inv_t - lse.float().unsqueeze(-1)
    p = torch.exp(logsm)
    g = (dlogp.float() * inv_t).unsqueeze(-1)
    grad = -p * g
    grad.scatter_add_(-1, targets.long().unsqueeze(-1), g)
    active = g != 0
    if dentropy is not None:
        e = (dentropy.float() * inv_t).unsqueeze(-1)
        grad = grad - e * torch.where(p == 0, torch.zeros_like(p), p * (logsm + entropy.float().unsqueeze(-1)))
        active = active | (e != 0)
    grad = torch.where(active, grad, torch.zeros_like(grad))
    if inplace:
        logits.copy_(grad)
        return logits
    return grad.to(logits.dtype)
