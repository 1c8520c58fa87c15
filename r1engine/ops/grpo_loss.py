"""Public GRPO-family loss on materialised logits: ``grpo_loss`` and ``token_logprobs``, with a backend switch.

The vocabulary pass is one ``torch.library`` operator, ``r1engine::logprobs`` (``r1engine.ops._library.custom_op``: a
fake kernel and an autograd formula), so the ops work with autograd and ``torch.compile(fullgraph=True)``, and eager
calls do not load the compiler. Its forward streams each live vocabulary row once (online log-sum-exp, and the
entropy when asked) and saves only O(N) tensors (plus a reference to the logits); its backward writes
``(onehot - softmax) * g / T`` (plus the entropy term) into a new tensor or, with ``inplace_backward=True``, into the
logits buffer itself (no second ``[N, V]`` tensor; the caller must not need the logits afterwards; under
``torch.compile`` functionalization may copy instead). Everything between the two passes, the O(N) loss math of every
variant, is :func:`r1engine.algo.policy_loss.policy_loss`, shared by all backends.

Backends (see ``r1engine.ops.backends``): ``"torch"`` (reference), ``"cpp"`` (C++ CPU kernel), ``"cuda"``,
``"triton"``, ``"auto"`` (the fastest available for the tensors' device).
"""

from __future__ import annotations

from typing import Any

import torch

from r1engine.algo.policy_loss import (
    GRPOLossOutput,
    GRPOMetrics,
    LossInputs,
    LossParams,
    policy_loss,
    prepare_loss_inputs,
)
from r1engine.ops._library import custom_op
from r1engine.ops.backends import load, resolve

__all__ = ["GRPOLossOutput", "GRPOMetrics", "LossParams", "grpo_loss", "token_logprobs"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the operators (run inside the ops, on concrete tensors).


def _check_targets_range(targets: torch.Tensor, vocab: int) -> None:
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets: expected values in [0, V) = [0, {vocab}), got {int(targets[idx])} at flat position {idx}"
        )


def _check_finite_lse(lse: torch.Tensor, live: torch.Tensor | None) -> None:
    bad = ~torch.isfinite(lse)
    if live is not None:
        bad &= live != 0
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"logits: expected finite values, got NaN/+inf (or a row that is entirely -inf) in flat row {idx}; "
            "pass check_finite=False to skip this check"
        )


def check_finite_inputs(weights: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """NaN/inf in the mask (hence the aggregation weights), or in an advantage or log-prob at a token the mask keeps,
    would make the loss NaN with no error: name the argument and the first such position (one O(N) pass each)."""
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("mask: expected finite values, got NaN/inf")
    kept = weights != 0
    for name, t in tensors.items():
        if t is None:
            continue
        bad = ~torch.isfinite(t) & kept
        if bool(bad.any()):
            raise ValueError(f"{name}: expected finite values where mask != 0, got {t[bad][0].item()} at flat "
                             f"position {int(bad.nonzero()[0, 0])}")  # fmt: skip


@custom_op("r1engine::check_loss_inputs", mutates_args=())
def _check_loss_inputs_op(
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
) -> None:
    # An operator, so that the data-dependent check does not break a torch.compile graph.
    check_finite_inputs(weights, advantages=advantages, old_logprobs=old_logp, ref_logprobs=ref_logp,
                        sampler_logprobs=sampler_logp)  # fmt: skip


@_check_loss_inputs_op.register_fake
def _(weights, advantages, old_logp, ref_logp, sampler_logp):
    return None


def checked_loss_inputs(
    token_shape: tuple[int, ...],
    device: torch.device,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    params: LossParams,
    check_finite: bool,
    **per_token: Any,
) -> LossInputs:
    """``prepare_loss_inputs`` and, with ``check_finite``, the NaN/inf check of the inputs (inside an operator)."""
    inputs = prepare_loss_inputs(token_shape, device, advantages, mask, params, **per_token)
    if check_finite:
        _check_loss_inputs_op(inputs.weights, inputs.advantages, inputs.old_logprobs, inputs.ref_logprobs,
                              inputs.sampler_logprobs)  # fmt: skip
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# The vocabulary pass. Inputs are already flattened: logits [N, V], per-token vectors [N].


@custom_op("r1engine::logprobs", mutates_args=())
def _logprobs_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    live: torch.Tensor | None,
    temperature: float,
    entropy: bool,
    backend: str,
    inplace_backward: bool,
    check_finite: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_targets_range(targets, logits.shape[1])
    logp, lse, ent = load(backend).logprobs_fwd(logits, targets, temperature=temperature, live=live, entropy=entropy)
    if check_finite:
        _check_finite_lse(lse, live)
    return logp, lse, ent


@_logprobs_op.register_fake
def _(logits, targets, live, temperature, entropy, backend, inplace_backward, check_finite):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))


def _logprobs_setup_context(ctx, inputs, output):
    logits, targets, _, temperature, entropy, backend, inplace, _ = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.temperature, ctx.entropy, ctx.backend, ctx.inplace = temperature, entropy, backend, inplace
    ctx.mark_non_differentiable(lse)


def _logprobs_backward(ctx, grad_logp, grad_lse, grad_ent):
    logits, targets, lse, ent = ctx.saved_tensors
    dlogp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
    dent = grad_ent.float().contiguous() if ctx.entropy and grad_ent is not None else None
    args = (logits, targets, lse, dlogp, dent, ent if dent is not None else None, ctx.temperature, ctx.backend)
    if ctx.inplace:
        _logprobs_backward_inplace_op(*args)
        grad = logits
    else:
        grad = _logprobs_backward_op(*args)
    return grad, None, None, None, None, None, None, None


_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


@custom_op("r1engine::logprobs_backward", mutates_args=())
def _logprobs_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    dentropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    return load(backend).logprobs_bwd(
        logits, targets, lse, dlogp, temperature=temperature, inplace=False, dentropy=dentropy, entropy=entropy
    )


@_logprobs_backward_op.register_fake
def _(logits, targets, lse, dlogp, dentropy, entropy, temperature, backend):
    return torch.empty_like(logits)


@custom_op("r1engine::logprobs_backward_inplace", mutates_args=("logits",))
def _logprobs_backward_inplace_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    dentropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    backend: str,
) -> None:
    load(backend).logprobs_bwd(
        logits, targets, lse, dlogp, temperature=temperature, inplace=True, dentropy=dentropy, entropy=entropy
    )


@_logprobs_backward_inplace_op.register_fake
def _(logits, targets, lse, dlogp, dentropy, entropy, temperature, backend):
    return None


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def _check_logits(logits: torch.Tensor, backend: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point tensor (float32 or bfloat16), got {logits.dtype}")
    if backend != "torch" and logits.dtype not in _FUSED_DTYPES:
        raise TypeError(f"logits: backend {backend!r} expects float32 or bfloat16, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape [B, T, V] or [N, V], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")


def _check_targets(targets: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets: expected shape {list(shape)} (logits.shape[:-1]), got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"targets: expected an integer tensor (int64), got {targets.dtype}")


def _flat_rows(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Differentiable ``log softmax(logits / T)[targets]`` in fp32, shape of ``targets``.

    ``logits [..., V]`` (fp32 or bf16), ``targets [...]`` integer in ``[0, V)``. ``check_finite`` raises on
    NaN/+inf logits (an O(N) check on the row log-sum-exps).
    """
    backend_name = resolve(backend, logits.device) if isinstance(logits, torch.Tensor) else backend
    _check_logits(logits, backend_name)
    _check_targets(targets, tuple(logits.shape[:-1]))
    LossParams(temperature=temperature)  # validates it
    logp, _, _ = _logprobs_op(
        _flat_rows(logits), targets.reshape(-1).long().contiguous(), None, float(temperature), False, backend_name,
        False, bool(check_finite),
    )  # fmt: skip
    return logp.reshape(targets.shape)


def grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    params: LossParams | None = None,
    sampler_logprobs: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    advantages_per: str | None = None,
    inplace_backward: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
    **loss_settings: Any,
) -> GRPOLossOutput:
    """The GRPO-family policy loss (0-d fp32, differentiable w.r.t. ``logits``) and its metrics, fused on the logits.

    Shapes: padded ``logits [B, T, V]`` with ``targets, mask, old_logprobs, ref_logprobs, sampler_logprobs [B, T]``
    and ``advantages [B]`` (per sequence) or ``[B, T]`` (per token); or packed ``logits [N, V]`` with per-token
    ``[N]`` tensors, ``advantages [N]`` or, with ``segment_ids [N]`` (each token's sequence index in ``[0, S)``),
    ``advantages [S]``; ``advantages_per`` ("token" | "sequence") says which where the shape cannot (N = S, see
    ``r1engine.algo.aggregation.token_advantages``). ``segment_ids`` also defines the sequences for the per-sequence
    aggregations and importance ratios; without it, packed tokens count as one sequence.

    ``params`` (:class:`~r1engine.algo.policy_loss.LossParams`) holds every loss setting: the policy loss (PPO clip
    with ``eps_low``/``eps_high``/``dual_clip``, or CISPO), token or sequence (GSPO) importance ratios, the KL
    estimator and ``beta``, the entropy bonus, the rollout-mismatch correction from ``sampler_logprobs`` (the
    log-probabilities the rollout engine sampled with), ``temperature`` and the aggregation; keyword
    ``loss_settings`` override its fields. ``old_logprobs=None`` is an on-policy step (ratio 1). Tokens outside the
    mask cost nothing in the fused kernels. ``inplace_backward=True`` writes the logits gradient into ``logits``;
    ``check_finite`` raises on NaN/inf logits and on NaN/inf inputs at masked-in tokens. Logits whose leading dims
    cannot be flattened without a copy (e.g. the view ``logits[:, :-1]``) are copied once; to avoid that, pass the
    full logits and mask the last position.

    Returns ``GRPOLossOutput(loss, metrics)``.
    """
    p = LossParams.build(params, **loss_settings)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    backend_name = resolve(backend, logits.device)
    _check_logits(logits, backend_name)
    token_shape = tuple(logits.shape[:-1])
    _check_targets(targets, token_shape)
    inputs = checked_loss_inputs(
        token_shape, logits.device, advantages, mask, p, check_finite, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, sampler_logprobs=sampler_logprobs, segment_ids=segment_ids,
        advantages_per=advantages_per,
    )  # fmt: skip
    logp, _, ent = _logprobs_op(
        _flat_rows(logits), targets.reshape(-1).long().contiguous(), inputs.live.to(torch.float32).contiguous(),
        float(p.temperature), p.needs_entropy, backend_name, bool(inplace_backward), bool(check_finite),
    )  # fmt: skip
    return policy_loss(logp, inputs, p, ent if p.needs_entropy else None)
