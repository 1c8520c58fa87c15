"""Group-relative advantages for GRPO and its variants, from per-completion scalar rewards.

Rewards come as ``[B * G]`` (groups of ``G`` consecutive completions of the same prompt) or ``[B, G]``; the result
has the same shape. Methods:

* ``"grpo"``:   ``(r - mean) / (std + eps)`` per group. ``std`` is the *unbiased* (Bessel-corrected) sample
  standard deviation, as ``torch.std`` and the GRPO implementations of TRL and verl use.
* ``"drgrpo"``: ``r - mean`` (Dr.GRPO: no division by the std, which biases towards easy/hard groups).
* ``"rloo"``:   ``r_i - mean_{j != i} r_j`` (REINFORCE leave-one-out baseline).

A group whose rewards are all equal gets exactly 0 (never NaN), and so does every group of size 1. Math is done
in float64 so that huge rewards do not overflow the variance; the result has the rewards' floating dtype
(float32 for integer or bool rewards).
"""

from __future__ import annotations

import torch

__all__ = ["ADVANTAGE_METHODS", "group_advantages", "token_advantages"]

ADVANTAGE_METHODS = ("grpo", "drgrpo", "rloo")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if rewards.dim() == 1:
        if rewards.numel() % group_size != 0:
            raise ValueError(
                f"rewards: expected a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
            )
        return rewards.reshape(-1, group_size)
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards: expected shape [B, group_size={group_size}], got shape {tuple(rewards.shape)}")
        return rewards
    raise ValueError(f"rewards: expected shape [B * G] or [B, G], got shape {tuple(rewards.shape)}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, method: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-completion advantages from rewards ``[B * G]`` or ``[B, G]`` (same shape out); see the module doc."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"method: expected one of {ADVANTAGE_METHODS}, got {method!r}")
    if eps < 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps!r}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = _grouped(rewards, group_size).double()
    if not torch.isfinite(r).all():
        raise ValueError("rewards: expected finite values, got NaN or inf")
    g = r.shape[1]
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # all-equal groups (and G == 1): exactly 0
    mean = r.mean(dim=1, keepdim=True)
    if method == "grpo":
        std = r.std(dim=1, keepdim=True, unbiased=True) if g > 1 else torch.zeros_like(mean)
        adv = (r - mean) / (std + eps)
    elif method == "drgrpo":
        adv = r - mean
    else:  # rloo
        if g == 1:
            adv = torch.zeros_like(r)
        else:
            total = r.sum(dim=1, keepdim=True)
            adv = r - (total - r) / (g - 1)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(out_dtype).reshape(rewards.shape)


def token_advantages(
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_tokens: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Broadcast per-sequence advantages to per-token ones.

    * padded batch: ``advantages [B]`` + ``mask [B, T]`` (or ``num_tokens=T``) -> ``[B, T]`` (zero where masked);
    * packed tokens: ``advantages [S]`` + ``segment_ids [N]`` (sequence index of each token) -> ``[N]``.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages: expected a per-sequence vector [B], got shape {tuple(advantages.shape)}")
    if segment_ids is not None:
        if segment_ids.dim() != 1 or segment_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"segment_ids: expected an integer tensor [N], got {segment_ids.dtype} shape {tuple(segment_ids.shape)}"
            )
        out = advantages[segment_ids.long()]
        return out if mask is None else out * mask.to(out.dtype)
    if mask is not None:
        if mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
            raise ValueError(f"mask: expected shape [B={advantages.shape[0]}, T], got shape {tuple(mask.shape)}")
        return advantages[:, None] * mask.to(advantages.dtype)
    if num_tokens is None:
        raise ValueError("token_advantages: pass mask [B, T], num_tokens=T, or segment_ids [N]")
    return advantages[:, None].expand(advantages.shape[0], num_tokens)
