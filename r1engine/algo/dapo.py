"""DAPO's data-side techniques (Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"), as
pure functions on plain tensors and token-id lists, usable by any trainer:

* **dynamic sampling**: a group whose rewards are all equal gets advantage 0 for every completion and adds no
  policy gradient; `informative_groups` finds the groups that do, `choose_groups` picks a step's batch from the
  groups sampled so far and `next_round_prompts` sizes the next round of sampling when too few of them vary;
* **overlong filtering**: `truncated_completions` marks the completions cut off by the length limit (no stop
  token at their end), whose tokens a trainer leaves out of the loss (TRL's ``mask_truncated_completions``);
* **soft overlong punishment**: `overlong_penalty`, the length-dependent penalty added to the reward of a
  completion that runs into the last `buffer_len` tokens before the limit (verl's ``overlong_buffer``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["choose_groups", "informative_groups", "next_round_prompts", "overlong_penalty", "truncated_completions"]


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have rewards that are not all equal: bool ``[B]`` from rewards ``[B * G]`` (groups of
    `group_size` consecutive completions of one prompt) or ``[B, G]``. The test is exact equality, the one
    `r1engine.algo.group_advantages` uses to give a group advantage 0."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if (
        rewards.dim() not in (1, 2)
        or rewards.numel() % group_size
        or (rewards.dim() == 2 and rewards.shape[1] != group_size)
    ):
        raise ValueError(f"rewards: expected shape [B * G] or [B, G] with G={group_size}, got {tuple(rewards.shape)}")
    r = rewards.reshape(-1, group_size)
    return (r != r[:, :1]).any(dim=1)


def choose_groups(informative: torch.Tensor, needed: int) -> tuple[list[int], int]:
    """The groups a step trains on, from the flags ``[B]`` of every group sampled for it (in sampling order): the
    first `needed` informative ones; when fewer vary, all of those and, to keep the batch at `needed` groups, the
    first uninformative ones (they add no policy gradient). Returns (group indices in ascending order, the number
    of uninformative groups filled in)."""
    if informative.dim() != 1 or informative.dtype != torch.bool:
        raise ValueError(f"informative: expected a bool [B] tensor, got {informative.dtype} {tuple(informative.shape)}")
    if not isinstance(needed, int) or isinstance(needed, bool) or not 0 <= needed <= len(informative):
        raise ValueError(f"needed: expected an int in [0, {len(informative)}] (the groups sampled), got {needed!r}")
    varying = torch.nonzero(informative).flatten().tolist()[:needed]
    filled = torch.nonzero(~informative).flatten().tolist()[: needed - len(varying)]
    return sorted(varying + filled), len(filled)


def next_round_prompts(missing: int, informative: int, sampled: int, limit: int) -> int:
    """Prompts to sample in the next round when `missing` informative groups are still needed, `informative` of
    the `sampled` groups so far varied: the number expected to supply the missing ones at the rate seen so far
    (`limit` when none varied yet), at least `missing` and at most `limit`."""
    for name, value in (("missing", missing), ("informative", informative), ("sampled", sampled), ("limit", limit)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    if informative > sampled:
        raise ValueError(f"informative: expected at most sampled={sampled}, got {informative}")
    if missing > limit:
        raise ValueError(f"missing: expected at most limit={limit}, got {missing}")
    if missing == 0:
        return 0
    expected = math.ceil(missing * sampled / informative) if informative else limit
    return min(limit, max(missing, expected))


def truncated_completions(completion_ids: Sequence[Sequence[int]], stop_token_ids: Iterable[int]) -> torch.Tensor:
    """Which completions were cut off: bool ``[N]``, True where a completion does not end with one of
    `stop_token_ids` (it ran into the length limit; an empty completion counts as cut off). A stop token at the
    last position allowed is a completion that ended, not a truncated one."""
    stops = {int(s) for s in stop_token_ids}
    return torch.tensor([not c or int(c[-1]) not in stops for c in completion_ids], dtype=torch.bool)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment of completions of `lengths` tokens (stop token included), float32 ``[N]``:
    0 up to ``max_len - buffer_len`` tokens, then falling linearly to ``-factor`` at `max_len`,
    ``-factor * (|y| - (max_len - buffer_len)) / buffer_len``, and ``-factor`` beyond `max_len`. Added to the
    reward before the advantages. `buffer_len` 0: no penalty."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths: expected a [N] tensor, got {getattr(lengths, 'shape', type(lengths).__name__)}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    if not isinstance(buffer_len, int) or isinstance(buffer_len, bool) or not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len: expected an int in [0, max_len={max_len}], got {buffer_len!r}")
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor: expected a finite value >= 0, got {factor!r}")
    if buffer_len == 0:
        return torch.zeros(len(lengths), dtype=torch.float32)
    excess = (lengths.double() - (max_len - buffer_len)).clamp(0.0, float(buffer_len))
    return torch.where(excess > 0, -factor * excess / buffer_len, 0.0).float()
