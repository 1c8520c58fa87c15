"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for the MTP self-drafter.

For drafts d_1..d_k from the draft distributions q_1..q_k and target distributions p_1..p_{k+1} (the *processed*
sampler distributions): accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw the
replacement from norm(max(0, p_j - q_j)) and stop; if all k are accepted draw a bonus token from p_{k+1}. The emitted
tokens are then distributed exactly as sampling from p one token at a time. A greedy drafter has one-hot q, so a
draft is accepted with probability p_j(d_j) and the replacement comes from p_j with d_j removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1engine.rollout.sampling import sample_from


@dataclass
class VerifyResult:
    """Per row: `num_accepted` drafts (0..k) and the extra token (`next_token`: replacement or bonus)."""

    num_accepted: torch.Tensor  # [B] long
    next_token: torch.Tensor  # [B] long


def verify_drafts(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Apply the acceptance rule row-wise.

    draft_tokens `[B, k]`; draft_probs `[B, k, V]` (None = greedy drafter, q one-hot at the draft);
    target_probs `[B, k+1, V]`. Returns how many drafts each row keeps and the token that follows them.
    """
    b, k = draft_tokens.shape
    if target_probs.shape[:2] != (b, k + 1):
        raise ValueError(f"target_probs must be [B, k+1, V] = [{b}, {k + 1}, V], got {tuple(target_probs.shape)}")
    p_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, k]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand(b, k, generator=generator, device=p_draft.device, dtype=torch.float32)
    # u < p/q  <=>  u * q < p  (no division by a zero q; q(d) > 0 always since d was drawn from q)
    accept = (u * q_draft) < p_draft
    rejected = ~accept
    # number of leading accepts: first False index, k when all accepted
    first_reject = torch.where(rejected.any(-1), rejected.float().argmax(-1), torch.full_like(p_draft[:, 0], k)).long()
    rows = torch.arange(b, device=draft_tokens.device)
    p_at = target_probs[rows, first_reject]  # [B, V] target at the stop position
    all_acc = first_reject == k
    if draft_probs is None:
        q_at = torch.zeros_like(p_at)
        idx = first_reject.clamp(max=k - 1) if k > 0 else first_reject
        if k > 0:
            q_at[rows, draft_tokens[rows, idx]] = 1.0
    else:
        q_at = draft_probs[rows, first_reject.clamp(max=max(k - 1, 0))] if k > 0 else torch.zeros_like(p_at)
    residual = (p_at - q_at).clamp(min=0)
    residual = torch.where(all_acc[:, None], p_at, residual)
    mass = residual.sum(-1, keepdim=True)
    # mass 0 only when p == q (then rejection has probability 0); fall back to p for numerical safety
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_at)
    nxt = sample_from(residual, generator)
    return VerifyResult(num_accepted=first_reject, next_token=nxt)
