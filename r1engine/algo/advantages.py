"""Advantage estimators: one registry, one input object and one output for every estimator.

An estimator turns the completions' scalar rewards into advantages. Rewards come as ``[B * G]`` (groups of ``G``
consecutive completions of the same prompt) or ``[B, G]``. Each is registered by name
(``register_advantage_estimator``) with its ``level``:

* ``"sequence"``: one advantage per completion, the rewards' shape (the group-relative estimators);
* ``"token"``: one per completion token, ``[B * G, T]`` completion-aligned and right-padded (0 on padding), with the
  value targets (``returns``) beside them; such an estimator ``needs_values`` (a value model's ``V(s_t)``).

Every estimator is called with one :class:`AdvantageInputs` and returns one :class:`AdvantageOutput`;
:func:`compute_advantages` looks the name up in :data:`ADVANTAGE_ESTIMATORS`, checks what the estimator needs and
what it returned. The built-in ones (``r`` a group's rewards, ``G`` its size):

* ``"grpo"``:   ``(r - mean) / (std + eps)`` per group. ``std`` is the *unbiased* (Bessel-corrected) sample
  standard deviation, as ``torch.std`` and the GRPO implementations of TRL and verl use.
* ``"drgrpo"``: ``r - mean`` (Dr.GRPO: no division by the std, which biases towards easy/hard groups).
* ``"rloo"``:   ``r_i - mean_{j != i} r_j`` (REINFORCE leave-one-out baseline).
* ``"reinforce_pp_baseline"``: REINFORCE++ with a baseline, as verl's ``reinforce_plus_plus_baseline``: ``x = r -
  mean`` per group (a group of one keeps its reward: its baseline is 0), then whitened over the whole batch, ``(x -
  mean_batch(x)) / (std_batch(x) + eps)``. The batch statistics count each completion once per loss token (verl
  whitens the advantage broadcast over the response tokens; ``lengths``), or once each without ``lengths``, with
  Bessel's correction, over every rank's completions when ``sum_across_ranks`` is given. verl adds its epsilon to
  the variance, not to the std. Because the batch mean is subtracted, an all-equal group's advantage is 0 only when
  that mean is.
* ``"gae"`` (token level): PPO's GAE(gamma, lambda) from the value model's values, the sequence reward at the last
  token and optional per-token rewards (``r1engine.algo.gae.gae_advantages``), whitened over the batch's tokens
  (``whiten``); ``returns`` are the lambda-returns, the value model's targets.

For ``grpo``, ``drgrpo`` and ``rloo`` a group whose rewards are all equal gets exactly 0 (never NaN), and so does
every group of size 1. The group-relative math is done in float64 so that huge rewards do not overflow the variance;
a sequence-level result has the rewards' floating dtype (float32 for integer or bool rewards).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

from r1engine.algo.gae import gae_advantages, whiten
from r1engine.algo.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "AdvantageInputs",
    "AdvantageOutput",
    "advantage_estimator",
    "compute_advantages",
    "group_advantages",
    "register_advantage_estimator",
    "token_advantages",
]

Level = Literal["sequence", "token"]


# ---------------------------------------------------------------------------------------------------- in and out


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read; the group-relative ones need only ``rewards`` and ``group_size``."""

    rewards: torch.Tensor
    """``[B * G]`` or ``[B, G]``: each completion's scalar reward (finite)."""
    group_size: int
    """``G``, the completions per prompt."""
    eps: float = 1e-6
    """Added to a standard deviation before dividing by it."""
    lengths: torch.Tensor | None = None
    """``[B * G]`` integers: each completion's loss tokens. Token-level estimators need them (each completion's extent
    in ``values``); batch statistics weight each completion by them."""
    values: torch.Tensor | None = None
    """``[B * G, T]``: the value model's ``V(s_t)`` per completion token, completion-aligned and right-padded."""
    token_rewards: torch.Tensor | None = None
    """``[B * G, T]`` (optional): rewards at every completion token (e.g. PPO's KL penalty), aligned like ``values``."""
    gamma: float = 1.0
    """Discount per token (token-level estimators)."""
    lam: float = 0.95
    """GAE's lambda."""
    whiten: bool = True
    """Whether a token-level estimator normalises its advantages over the batch's tokens."""
    sum_across_ranks: Callable[[list[float]], list[float]] | None = None
    """Element-wise sum of a list of floats over the data-parallel ranks, for statistics of the whole batch when each
    rank holds a share of it (``r1engine.trainer.distributed.sum_across_ranks``); None: this batch is the whole."""

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, torch.Tensor):
            raise TypeError(f"rewards: expected a torch.Tensor, got {type(self.rewards).__name__}")
        _grouped(self.rewards, self.group_size)  # checks group_size and the rewards' shape
        if not (isinstance(self.eps, int | float) and not isinstance(self.eps, bool) and self.eps >= 0):
            raise ValueError(f"eps: expected a value >= 0, got {self.eps!r}")
        if not torch.isfinite(self.rewards.double()).all():
            raise ValueError("rewards: expected finite values, got NaN or inf")
        n = self.rewards.numel()
        if self.lengths is not None:
            lengths = self.lengths
            if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (n,) or lengths.is_floating_point():
                raise ValueError(
                    f"lengths: expected an integer tensor of shape [{n}] (loss tokens per completion), got "
                    f"{getattr(lengths, 'dtype', type(lengths).__name__)} shape {list(getattr(lengths, 'shape', []))}"
                )
            if n and int(lengths.min()) < 0:
                raise ValueError(f"lengths: expected values >= 0, got {lengths.tolist()}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")

    @property
    def num_completions(self) -> int:
        return self.rewards.numel()

    def grouped(self) -> torch.Tensor:
        """The rewards as float64 ``[B, G]``."""
        return _grouped(self.rewards, self.group_size).double()

    def batch_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (as they are without ``sum_across_ranks``)."""
        values = [float(v) for v in values]
        return list(values) if self.sum_across_ranks is None else [float(v) for v in self.sum_across_ranks(values)]

    def replace(self, **changes) -> AdvantageInputs:
        return dataclasses.replace(self, **changes)


class AdvantageOutput(NamedTuple):
    """An estimator's result.

    ``advantages``: the rewards' shape (level "sequence"; any floating dtype, ``[B, G]`` accepted) or ``[B * G, T]``
    (level "token", 0 on padding). ``returns``: the value model's targets ``[B * G, T]`` (every token-level
    estimator gives them). ``pre_whitening``: the advantages before a batch normalisation, where the estimator
    applies one (for metrics)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    pre_whitening: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------------ registry

EstimatorFn = Callable[[AdvantageInputs], AdvantageOutput]


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: the function and what a trainer must know about it."""

    name: str
    fn: EstimatorFn
    level: Level
    """"sequence": one advantage per completion; "token": one per completion token, with returns."""
    needs_values: bool
    """Whether it needs a value model's values (the trainer must own a value model)."""
    min_group_size: int
    """The smallest ``group_size`` it is meaningful for (the config refuses smaller ones)."""


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage")


def register_advantage_estimator(
    name: str, *, level: Level = "sequence", needs_values: bool = False, min_group_size: int = 1
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(inputs: AdvantageInputs) -> AdvantageOutput`` under ``name`` (``grpo.advantage`` selects it).

    ``level`` "sequence" returns one advantage per completion, "token" one per completion token and the returns;
    ``needs_values`` says it reads ``inputs.values`` (a trainer with a value model runs it); ``min_group_size`` is the
    smallest group it makes sense for."""
    if level not in ("sequence", "token"):
        raise ValueError(f"level: expected 'sequence' or 'token', got {level!r}")
    if not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"min_group_size: expected a positive int, got {min_group_size!r}")

    def deco(fn: EstimatorFn) -> EstimatorFn:
        if name not in ADVANTAGE_ESTIMATORS or ADVANTAGE_ESTIMATORS[name].fn is not fn:  # the same fn again: a no-op
            spec = AdvantageEstimator(name, fn, level, bool(needs_values), min_group_size)
            ADVANTAGE_ESTIMATORS.register(name)(spec)  # another one under this name: an error
        return fn

    return deco


def advantage_estimator(name: str, *, key: str | None = None) -> AdvantageEstimator:
    """The estimator registered as ``name``; a ValueError naming ``key`` (default: "advantage") and the known names
    otherwise."""
    if key is not None and name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"{key}: expected one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}")
    return ADVANTAGE_ESTIMATORS.lookup(name)


def compute_advantages(name: str, inputs: AdvantageInputs) -> AdvantageOutput:
    """Run the estimator registered as ``name`` on ``inputs``: sequence-level advantages come back in the rewards'
    shape and floating dtype (float32 for integer or bool rewards), token-level ones as ``[B * G, T]``."""
    est = advantage_estimator(name)
    if not isinstance(inputs, AdvantageInputs):
        raise TypeError(f"inputs: expected an AdvantageInputs, got {type(inputs).__name__}")
    if est.needs_values and inputs.values is None:
        raise ValueError(f"values: the advantage estimator {name!r} needs a value model's values [B * G, T]")
    if est.level == "token" and inputs.lengths is None:
        raise ValueError(f"lengths: the token-level advantage estimator {name!r} needs the completions' lengths")
    out = est.fn(inputs)
    if not isinstance(out, AdvantageOutput):
        raise TypeError(f"advantage estimator {name!r}: expected an AdvantageOutput, got {type(out).__name__}")
    adv, rewards = out.advantages, inputs.rewards
    if est.level == "sequence":
        if adv.shape not in (rewards.shape, _grouped(rewards, inputs.group_size).shape):
            raise ValueError(
                f"advantage estimator {name!r}: expected advantages of shape {list(rewards.shape)} (one per "
                f"completion), got {list(adv.shape)}"
            )
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return out._replace(advantages=adv.to(dtype).reshape(rewards.shape))
    if adv.dim() != 2 or adv.shape[0] != rewards.numel():
        raise ValueError(
            f"advantage estimator {name!r}: expected token-level advantages of shape [{rewards.numel()}, T], got "
            f"{list(adv.shape)}"
        )
    if out.returns is None or out.returns.shape != adv.shape:
        got = None if out.returns is None else list(out.returns.shape)
        raise ValueError(f"advantage estimator {name!r}: expected returns of shape {list(adv.shape)}, got {got}")
    return out


# ----------------------------------------------------------------------------------------------- the estimators


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


def _zero_equal_groups(r: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``adv`` with the groups of ``r [B, G]`` whose rewards are all equal (and every group of one) set to 0."""
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


@register_advantage_estimator("grpo", min_group_size=2)
def grpo_advantages(x: AdvantageInputs) -> AdvantageOutput:
    """``(r - mean) / (std + eps)`` per group, Bessel-corrected std."""
    r = x.grouped()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True) if r.shape[1] > 1 else torch.zeros_like(mean)
    return AdvantageOutput(_zero_equal_groups(r, (r - mean) / (std + x.eps)))


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(x: AdvantageInputs) -> AdvantageOutput:
    """``r - mean`` per group (Dr.GRPO)."""
    r = x.grouped()
    return AdvantageOutput(_zero_equal_groups(r, r - r.mean(dim=1, keepdim=True)))


@register_advantage_estimator("rloo")
def rloo_advantages(x: AdvantageInputs) -> AdvantageOutput:
    """``r_i - mean_{j != i} r_j`` (leave-one-out baseline)."""
    r = x.grouped()
    g = r.shape[1]
    if g == 1:
        return AdvantageOutput(torch.zeros_like(r))
    total = r.sum(dim=1, keepdim=True)
    return AdvantageOutput(_zero_equal_groups(r, r - (total - r) / (g - 1)))


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(x: AdvantageInputs) -> AdvantageOutput:
    """REINFORCE++ with a baseline: the group mean subtracted (none for a group of one), then whitened over the
    batch (weighted by ``lengths``, Bessel-corrected, over every rank)."""
    r = x.grouped()
    centred = r if r.shape[1] == 1 else _zero_equal_groups(r, r - r.mean(dim=1, keepdim=True))
    flat = centred.reshape(-1)
    w = torch.ones_like(flat) if x.lengths is None else x.lengths.to(flat)
    total, weighted = x.batch_sum([w.sum(), (w * flat).sum()])
    if total <= 0:  # no completion has a loss token: nothing to train on
        return AdvantageOutput(torch.zeros_like(centred), pre_whitening=centred)
    mean = weighted / total
    (squares,) = x.batch_sum([(w * (flat - mean) ** 2).sum()])
    std = math.sqrt(squares / (total - 1)) if total > 1 else 0.0
    return AdvantageOutput((centred - mean) / (std + x.eps), pre_whitening=centred)


@register_advantage_estimator("gae", level="token", needs_values=True)
def gae_estimator(x: AdvantageInputs) -> AdvantageOutput:
    """PPO's token-level GAE from the value model's values (``r1engine.algo.gae``), whitened over the batch's
    tokens when ``whiten``."""
    lengths = x.lengths.long()
    adv, returns = gae_advantages(
        x.values, x.rewards.reshape(-1), lengths, gamma=x.gamma, lam=x.lam, token_rewards=x.token_rewards
    )
    if not x.whiten:
        return AdvantageOutput(adv, returns)
    valid = torch.arange(adv.shape[1], device=adv.device)[None, :] < lengths.to(adv.device)[:, None]
    return AdvantageOutput(whiten(adv, valid), returns, pre_whitening=adv)


# ---------------------------------------------------------------------------------------------- plain functions


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, method: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-completion advantages from rewards ``[B * G]`` or ``[B, G]`` (same shape out) by the sequence-level
    estimator ``method``; see the module doc."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    est = advantage_estimator(method, key="method")
    if est.level != "sequence":
        raise ValueError(
            f"method: {method!r} gives per-token advantages (it needs values and lengths): call compute_advantages"
        )
    return compute_advantages(method, AdvantageInputs(rewards, group_size, eps=eps)).advantages


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
