"""The GRPO loss family on per-token log-probabilities: one parameter object, registries, one implementation.

Every loss path (the reference on materialised logits, the fused operator ``r1engine.ops.grpo_loss`` and the
lm_head-fused ``r1engine.ops.linear_grpo_loss``, on every backend) computes the per-token log-probabilities (and,
when asked, entropies) in its own O(N * V) pass over the vocabulary, and then calls :func:`policy_loss` here for the
O(N) rest: importance ratio, policy loss, rollout-mismatch correction, KL, entropy bonus, aggregation and metrics.
Autograd carries the gradient back to the log-probabilities, and each path's fused backward takes it from there. A
variant is therefore written once and runs on every backend.

Per token t (``ratio = pi / pi_old``; ``w_agg`` from :func:`~r1engine.algo.loss.aggregation_weights`)::

    loss = sum_t w_agg_t * (w_is_t * policy_t + beta * kl_t - entropy_coef * H_t)

* ``policy_t`` (``POLICY_LOSSES``, chosen by ``policy_loss``): ``"ppo_clip"`` the clipped surrogate
  ``-min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)`` with optional dual-clip (GRPO, DAPO's
  clip-higher with ``eps_high > eps_low``); ``"cispo"`` ``-sg(min(ratio, cispo_max_ratio)) * A * logp`` (MiniMax-M1's
  clipped importance-sampling policy optimisation, as TRL and Liger-Kernel define it: the weight is clipped and
  detached, so every token keeps a gradient).
* ``importance_sampling_level="sequence"`` (GSPO): ``ratio`` is ``exp`` of the mean log-ratio over the sequence's
  loss tokens, the same for all of them, with the gradient of that mean (as TRL, Liger-Kernel and verl define it).
* ``w_is_t``, the rollout-mismatch correction (``rollout_correction``): ``rho = exp(old_logp - sampler_logp)``,
  per token or (level "sequence") the product over the sequence's loss tokens, detached; "truncate" uses
  ``clamp(rho, rollout_correction_min, rollout_correction_max)`` (truncated importance sampling), "mask" uses ``rho``
  inside ``[rollout_correction_min, rollout_correction_max]`` and 0 outside (masked importance sampling: the tokens
  or sequences whose sampler drifted too far are dropped). It scales the policy term only.
* ``kl_t`` (``r1engine.algo.kl.KL_ESTIMATORS``): k1, k2, k3 or verl's ``low_var_kl`` against the reference
  log-probabilities; ``kl_bias_correction`` multiplies it by ``ratio`` (TRL's ``use_bias_correction_kl``, from
  DeepSeek-V3.2: the estimate is unbiased for samples of the current policy, not the old one).
* ``H_t``: the entropy of the token's distribution (at ``temperature``), computed in the same vocabulary pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from r1engine.algo.aggregation import AGGREGATIONS, aggregation_weights, masked_mean, token_advantages
from r1engine.algo.kl import KL_ESTIMATORS
from r1engine.algo.registry import Registry

__all__ = [
    "GRPOMetrics",
    "IMPORTANCE_SAMPLING_LEVELS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "GRPOLossOutput",
    "LossInputs",
    "LossParams",
    "clipped_surrogate",
    "policy_loss",
    "prepare_loss_inputs",
    "register_policy_loss",
]

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = (None, "truncate", "mask")


@dataclasses.dataclass(frozen=True)
class GRPOMetrics:
    """Diagnostics of one loss evaluation, each a 0-d fp32 tensor averaged over the loss tokens (None: not computed
    by this loss)."""

    clip_frac: torch.Tensor  # fraction of tokens whose clip (dual-clip, CISPO cap) is active
    kl_mean: torch.Tensor  # mean KL estimate (0 without a reference or with beta == 0)
    ratio_mean: torch.Tensor  # mean importance ratio pi / pi_old (the sequence's, at sequence level)
    num_tokens: torch.Tensor  # number of loss tokens (as a float)
    entropy_mean: torch.Tensor | None = None  # mean token entropy (when computed)
    is_ratio_mean: torch.Tensor | None = None  # mean rollout-mismatch ratio pi_old / pi_sampler (when corrected)
    is_corrected_frac: torch.Tensor | None = None  # fraction of tokens whose mismatch ratio was truncated / masked


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PPO/GRPO surrogate ``s`` (to be maximized) and a 0/1 float mask of tokens where a clip is active.

    ``s = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)``; with ``dual_clip = c > 1`` and ``A < 0``,
    ``s = max(s, c * A)`` (bounds the loss of very off-policy tokens with negative advantage).
    """
    unclipped = ratio * advantages
    clipped_obj = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    s = torch.minimum(unclipped, clipped_obj)
    active = ((ratio < 1.0 - eps_low) & (advantages < 0)) | ((ratio > 1.0 + eps_high) & (advantages > 0))
    if dual_clip is not None and dual_clip != 0:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip: expected None, 0 (off) or a value > 1, got {dual_clip!r}")
        dual = (advantages < 0) & (ratio > dual_clip)
        s = torch.where(dual, dual_clip * advantages, s)
        active = active | dual
    return s, active.to(torch.float32)


# ----------------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class LossParams:
    """Every setting of the policy loss, validated once here; the config builds one and every layer passes it on.

    See the module docstring for the formulas. ``agg``/``max_len``: the aggregation
    (:func:`~r1engine.algo.loss.aggregation_weights`). ``track_entropy``: compute the entropy for the metrics even
    when ``entropy_coef`` is 0 (it costs a little in the vocabulary pass)."""

    policy_loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    cispo_max_ratio: float = 5.0
    importance_sampling_level: str = "token"
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    track_entropy: bool = False
    temperature: float = 1.0
    agg: str = "seq-mean-token-mean"
    max_len: int | None = None
    rollout_correction: str | None = None
    rollout_correction_level: str = "token"
    rollout_correction_min: float = 0.0
    rollout_correction_max: float = 2.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.kl_estimator, int)
            and not isinstance(self.kl_estimator, bool)
            and 1 <= self.kl_estimator <= 3
        ):
            object.__setattr__(self, "kl_estimator", f"k{self.kl_estimator}")  # the kernels' old integer ids
        if self.dual_clip == 0:
            object.__setattr__(self, "dual_clip", None)
        _choice("policy_loss", self.policy_loss, tuple(POLICY_LOSSES))
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        _choice("agg", self.agg, AGGREGATIONS)
        _choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        _choice("rollout_correction_level", self.rollout_correction_level, IMPORTANCE_SAMPLING_LEVELS)
        _finite("temperature", self.temperature, low=0.0, strict=True)
        _finite("eps_low", self.eps_low, low=0.0)
        _finite("eps_high", self.eps_high, low=0.0)
        _finite("beta", self.beta, low=0.0)
        _finite("entropy_coef", self.entropy_coef)
        _finite("cispo_max_ratio", self.cispo_max_ratio, low=0.0, strict=True)
        _finite("rollout_correction_min", self.rollout_correction_min, low=0.0)
        _finite("rollout_correction_max", self.rollout_correction_max, low=0.0, strict=True)
        if self.rollout_correction_min >= self.rollout_correction_max:
            raise ValueError(
                f"rollout_correction_min/rollout_correction_max: expected min < max, got {self.rollout_correction_min}"
                f"/{self.rollout_correction_max}"
            )
        if self.dual_clip is not None:
            _finite("dual_clip", self.dual_clip, low=1.0, strict=True, hint="None, 0 (off) or ")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
            raise ValueError(f"max_len: expected a positive int or None, got {self.max_len!r}")
        if self.policy_loss == "cispo" and self.importance_sampling_level == "sequence":
            raise ValueError("importance_sampling_level: 'sequence' (GSPO) does not combine with policy_loss='cispo'")
        for name in ("kl_bias_correction", "track_entropy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    @property
    def needs_entropy(self) -> bool:
        """Whether the vocabulary pass must compute entropies."""
        return self.entropy_coef != 0.0 or self.track_entropy

    def replace(self, **changes: Any) -> LossParams:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, params: LossParams | None = None, **overrides: Any) -> LossParams:
        """``params`` (default: the defaults) with keyword ``overrides``, for entry points that accept both."""
        base = params if params is not None else cls()
        if not isinstance(base, LossParams):
            raise TypeError(f"params: expected a LossParams, got {type(base).__name__}")
        if not overrides:
            return base
        unknown = set(overrides) - set(_FIELD_NAMES)
        if unknown:
            raise TypeError(f"unexpected loss setting(s) {sorted(unknown)}; LossParams has {', '.join(_FIELD_NAMES)}")
        # Plain attribute reads, not dataclasses.replace: this also runs inside torch.compile'd code.
        return cls(**{**{name: getattr(base, name) for name in _FIELD_NAMES}, **overrides})


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _finite(name: str, value: Any, low: float | None = None, strict: bool = False, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name}: expected {hint}a finite value{bound}, got {value!r}")


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LossParams))


# ----------------------------------------------------------------------------------------------------- registries

PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossParams], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy_loss")
register_policy_loss = POLICY_LOSSES.register
"""Register ``fn(ratio, logp, advantages, params) -> (per-token loss, 0/1 clipped)`` under a name. ``ratio`` is
pi / pi_old (token or sequence level, differentiable), ``logp`` the token log-probabilities (differentiable); the
loss is minimised."""


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, p: LossParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate of PPO / GRPO / DAPO (clip-higher), with dual-clip when ``dual_clip`` is set."""
    s, clipped = clipped_surrogate(ratio, adv, p.eps_low, p.eps_high, p.dual_clip)
    return -s, clipped


@register_policy_loss("cispo")
def cispo_loss(
    ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, p: LossParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO: ``-sg(min(ratio, cispo_max_ratio)) * A * logp``."""
    r = ratio.detach()
    return -(r.clamp(max=p.cispo_max_ratio) * adv * logp), (r > p.cispo_max_ratio).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------- inputs


class GRPOLossOutput(NamedTuple):
    """What every GRPO loss entry point returns: the 0-d fp32 loss (differentiable) and its detached metrics."""

    loss: torch.Tensor
    metrics: GRPOMetrics


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """The per-token inputs of :func:`policy_loss`, flattened to ``[N]`` (fp32 unless noted).

    ``seq`` (int64) numbers each token's sequence (the row of a padded batch, ``segment_ids`` of a packed one, 0
    when packed without them); ``weights`` are the aggregation weights; ``live`` is ``mask != 0`` (bool)."""

    advantages: torch.Tensor
    mask: torch.Tensor
    live: torch.Tensor
    weights: torch.Tensor
    seq: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    sampler_logprobs: torch.Tensor | None


def _token_tensor(
    name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} (one value per token), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (like the logits), got {t.device}")
    return t.reshape(-1).float()


def prepare_loss_inputs(
    token_shape: tuple[int, ...],
    device: torch.device,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    params: LossParams,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    sampler_logprobs: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    advantages_per: str | None = None,
) -> LossInputs:
    """Check and flatten the per-token inputs of a padded (``token_shape = (B, T)``) or packed (``(N,)``) batch.

    ``advantages``: ``[B]`` or ``[B, T]`` padded; ``[N]``, or ``[S]`` with ``segment_ids``, packed (``advantages_per``
    says which where the shape cannot, see :func:`~r1engine.algo.loss.token_advantages`)."""
    if len(token_shape) not in (1, 2):
        raise ValueError(f"expected padded [B, T] or packed [N] tokens, got token shape {list(token_shape)}")
    mask_flat = _token_tensor("mask", mask, token_shape, device)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages: expected a torch.Tensor, got {type(advantages).__name__}")
    n = mask_flat.shape[0]
    if len(token_shape) == 2:
        if segment_ids is not None:
            raise ValueError("segment_ids: only valid with packed tokens [N], got a padded batch [B, T]")
        b, t = token_shape
        if tuple(advantages.shape) == (b,):
            adv = advantages.float()[:, None].expand(b, t).reshape(-1)
        elif tuple(advantages.shape) == (b, t):
            adv = advantages.float().reshape(-1)
        else:
            raise ValueError(
                f"advantages: expected shape [{b}] (per sequence) or [{b}, {t}] (per token), got "
                f"{list(advantages.shape)}"
            )
        seq = torch.arange(b, device=device).repeat_interleave(t)
    else:
        if segment_ids is not None:
            if tuple(segment_ids.shape) != token_shape or segment_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"segment_ids: expected an integer tensor of shape {list(token_shape)}, got {segment_ids.dtype} "
                    f"shape {list(segment_ids.shape)}"
                )
        adv = token_advantages(advantages.float(), n, segment_ids, advantages_per)
        seq = segment_ids.long() if segment_ids is not None else torch.zeros(n, dtype=torch.long, device=device)
        if params.importance_sampling_level == "sequence" and segment_ids is None:
            raise ValueError(
                "segment_ids: importance_sampling_level='sequence' (GSPO) needs them with packed tokens (which "
                "sequence each token belongs to)"
            )
    if params.rollout_correction is not None and sampler_logprobs is None:
        raise ValueError(
            f"sampler_logprobs: rollout_correction={params.rollout_correction!r} needs the log-probabilities the "
            "rollout engine sampled with"
        )
    weights = aggregation_weights(mask, params.agg, max_len=params.max_len, segment_ids=segment_ids).reshape(-1)
    return LossInputs(
        advantages=adv.contiguous(),
        mask=mask_flat,
        live=mask_flat != 0,
        weights=weights.float().contiguous(),
        seq=seq,
        old_logprobs=_token_tensor("old_logprobs", old_logprobs, token_shape, device),
        ref_logprobs=_token_tensor("ref_logprobs", ref_logprobs, token_shape, device),
        sampler_logprobs=_token_tensor("sampler_logprobs", sampler_logprobs, token_shape, device),
    )


# ------------------------------------------------------------------------------------------------------------ loss


def _segment_sum(x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Per token, the sum of ``x`` over its sequence (static shapes: traces under torch.compile)."""
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add(0, seq, x)[seq]


def _rollout_correction(
    old: torch.Tensor, sampler: torch.Tensor, live: torch.Tensor, seq: torch.Tensor, p: LossParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight of the policy term, rho, 0/1 where the correction changed rho), all detached."""
    log_rho = torch.where(live, old - sampler, torch.zeros_like(old))
    if p.rollout_correction_level == "sequence":
        log_rho = _segment_sum(log_rho, seq)
    rho = torch.exp(log_rho)
    outside = (rho < p.rollout_correction_min) | (rho > p.rollout_correction_max)
    if p.rollout_correction == "truncate":
        weight = rho.clamp(p.rollout_correction_min, p.rollout_correction_max)
    else:
        weight = torch.where(outside, torch.zeros_like(rho), rho)
    return weight, rho, outside.to(torch.float32)


def policy_loss(
    logp: torch.Tensor, inputs: LossInputs, params: LossParams, entropy: torch.Tensor | None = None
) -> GRPOLossOutput:
    """The loss (0-d fp32) and metrics from per-token log-probabilities ``logp [N]`` (differentiable) and, when
    ``params.needs_entropy``, entropies ``entropy [N]`` (differentiable). See the module docstring."""
    p, x = params, inputs
    live = x.live
    logp = logp.float()
    # Tokens outside the mask get neutral inputs, so that nothing there overflows (their weight is 0, but inf * 0
    # would still turn into NaN in the backward).
    old = logp.detach() if x.old_logprobs is None else torch.where(live, x.old_logprobs, logp.detach())
    log_ratio = logp - old
    if p.importance_sampling_level == "sequence":
        lengths = _segment_sum(live.to(torch.float32), x.seq).clamp(min=1.0)
        log_ratio = _segment_sum(torch.where(live, log_ratio, torch.zeros_like(log_ratio)), x.seq) / lengths
    ratio = torch.exp(log_ratio)
    term, clipped = POLICY_LOSSES[p.policy_loss](ratio, logp, x.advantages, p)

    is_ratio = is_corrected = None
    if p.rollout_correction is not None:
        weight, is_ratio, is_corrected = _rollout_correction(old.detach(), x.sampler_logprobs, live, x.seq, p)
        term = term * weight

    kl = None
    if x.ref_logprobs is not None and p.beta != 0.0:
        ref = torch.where(live, x.ref_logprobs, logp.detach())
        kl = KL_ESTIMATORS[p.kl_estimator](logp, ref)
        term = term + p.beta * (kl * ratio if p.kl_bias_correction else kl)
    if p.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy: entropy_coef != 0 needs the per-token entropies of the vocabulary pass")
        term = term - p.entropy_coef * entropy.float()

    per_token = torch.where(x.weights != 0, x.weights * term, torch.zeros_like(term))
    with torch.no_grad():
        m = x.mask
        metrics = GRPOMetrics(
            clip_frac=masked_mean(clipped, m),
            kl_mean=masked_mean(kl, m) if kl is not None else torch.zeros((), device=m.device),
            ratio_mean=masked_mean(ratio, m),
            num_tokens=live.sum().to(torch.float32),
            entropy_mean=masked_mean(entropy, m) if entropy is not None else None,
            is_ratio_mean=masked_mean(is_ratio, m) if is_ratio is not None else None,
            is_corrected_frac=masked_mean(is_corrected, m) if is_corrected is not None else None,
        )
    return GRPOLossOutput(per_token.sum(), metrics)
