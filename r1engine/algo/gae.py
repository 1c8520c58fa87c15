"""PPO's advantage side: token-level GAE(gamma, lambda), batch whitening and the clipped value loss.

A completion of length L is an episode of L actions (tokens). The sequence-level reward (e.g. the rule-based
accuracy + format score) arrives at the last token; optional per-token rewards (e.g. InstructGPT's KL penalty
``-beta * (log pi_old - log pi_ref)``) arrive at every token. With per-token values ``V_t`` (``V_L := 0``, the
episode ends)::

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = sum_{k >= t} (gamma * lambda)^(k - t) * delta_k          (GAE)
    R_t     = A_t + V_t                                                (the lambda-return: the value target)

lambda = 1, gamma = 1 gives ``A_t = (final reward + later token rewards) - V_t`` (Monte-Carlo, unbiased, high
variance); lambda = 0 gives the one-step TD error (low variance, as biased as the value model).

Tensors are completion-aligned and right-padded: ``[B, T]`` with column 0 the first completion token and
``lengths[b]`` valid columns. The backward discounted sum runs blockwise: inside a block of ``block`` columns it is
one matrix product with the decay matrix ``D[k, t] = (gamma * lambda)^(k - t)`` (k >= t), and a Python loop carries
the sum across blocks only, so a 32k-token completion costs ``32k / block`` iterations, not 32k.
"""

from __future__ import annotations

import torch

__all__ = ["clipped_value_loss", "discounted_reverse_cumsum", "gae_advantages", "whiten"]


def _check_padded(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def discounted_reverse_cumsum(x: torch.Tensor, discount: float, *, block: int = 128) -> torch.Tensor:
    """``y_t = sum_{k >= t} discount^(k - t) * x_k`` along the last dim of ``x [B, T]`` (float64 inside)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [B, T], got {list(x.shape)}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount: expected a value in [0, 1], got {discount!r}")
    if block < 1:
        raise ValueError(f"block: expected a positive int, got {block!r}")
    b, t = x.shape
    xd = x.double()
    out = torch.zeros_like(xd)
    if t == 0:
        return out.to(x.dtype if x.is_floating_point() else torch.float32)
    width = min(block, t)
    idx = torch.arange(width, dtype=torch.float64, device=x.device)
    gap = idx[:, None] - idx[None, :]  # gap[k, t] = k - t
    # torch.pow(0., 0.) == 1, so discount = 0 keeps the diagonal (y = x) as it must.
    decay = torch.where(gap >= 0, torch.pow(torch.tensor(discount, dtype=torch.float64), gap.clamp(min=0)), 0.0)
    carry = xd.new_zeros(b)  # y at the first column after the current block
    for end in range(t, 0, -width):
        start = max(0, end - width)
        n = end - start
        local = xd[:, start:end] @ decay[:n, :n]  # the block's own terms
        tail = torch.pow(torch.tensor(discount, dtype=torch.float64), (n - idx[:n]))  # discount^(end - t)
        out[:, start:end] = local + carry[:, None] * tail[None, :]
        carry = out[:, start]
    return out.to(x.dtype if x.is_floating_point() else torch.float32)


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    token_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE for right-padded completions; returns ``(advantages, returns)``, both ``[B, T]`` fp32,
    0 on padding.

    ``values [B, T]``: the value model's ``V(s_t)`` per completion token (padding ignored); ``rewards [B]``: the
    sequence reward, given at the last token ``lengths[b] - 1``; ``lengths [B]`` in ``[0, T]``; ``token_rewards
    [B, T]`` (optional): rewards at every token (e.g. a KL penalty). A zero-length row gets zeros.
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values: expected a [B, T] tensor, got {getattr(values, 'shape', type(values).__name__)}")
    b, t = values.shape
    _check_padded("rewards", rewards, (b,))
    _check_padded("lengths", lengths, (b,))
    if token_rewards is not None:
        _check_padded("token_rewards", token_rewards, (b, t))
    if lengths.dtype.is_floating_point or (b and (int(lengths.min()) < 0 or int(lengths.max()) > t)):
        raise ValueError(f"lengths: expected integers in [0, T={t}], got {lengths.tolist()}")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    lengths = lengths.long()
    valid = _valid_mask(lengths, t)
    v = torch.where(valid, values.double(), 0.0)
    r = torch.zeros(b, t, dtype=torch.float64, device=values.device)
    if token_rewards is not None:
        r = torch.where(valid, token_rewards.double(), 0.0)
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    r[has_tokens, last[has_tokens]] += rewards.double()[has_tokens]
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]  # V_{t+1}, and 0 past the last token (padding is 0 in v)
    delta = torch.where(valid, r + gamma * next_v - v, 0.0)
    adv = discounted_reverse_cumsum(delta, gamma * lam)
    returns = torch.where(valid, adv + v, 0.0)
    return adv.float(), returns.float()


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the entries where ``mask`` is set (0 elsewhere): PPO's per-batch advantage
    normalisation. ``shift_mean=False`` only rescales (keeps the sign of every entry)."""
    if x.shape != mask.shape:
        raise ValueError(f"mask: expected the shape of x {list(x.shape)}, got {list(mask.shape)}")
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return torch.zeros_like(x)
    sel = x[m].double()
    mean = sel.mean()
    std = sel.std(unbiased=False) if n > 1 else torch.zeros((), dtype=torch.float64)
    out = (x.double() - mean) if shift_mean else x.double()
    out = out / (std + eps)
    return torch.where(m, out, 0.0).to(x.dtype)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss ``0.5 * mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` over masked
    tokens, and the fraction of tokens where the clipped term is the larger (the clip is active).

    ``clip_range=None`` is the plain squared error. All tensors share one shape; gradients flow into ``values``.
    """
    for name, tensor in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if tensor.shape != values.shape:
            raise ValueError(f"{name}: expected the shape of values {list(values.shape)}, got {list(tensor.shape)}")
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"clip_range: expected a value > 0 (or None to disable), got {clip_range!r}")
    m = mask.float()
    count = m.sum().clamp(min=1.0)
    v = values.float()
    err = (v - returns) ** 2
    if clip_range is None:
        return 0.5 * (err * m).sum() / count, v.new_zeros(())
    clipped = old_values + (v - old_values).clamp(-clip_range, clip_range)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(err, err_clipped) * m).sum() / count
    clip_frac = ((err_clipped > err).float() * m).sum() / count
    return loss, clip_frac.detach()
