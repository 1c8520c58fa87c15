"""Public fused GRPO-loss operators: ``grpo_loss`` and ``token_logprobs`` with a backend switch.

Both are ``torch.library`` operators (``r1engine.ops._library.custom_op``: a fake kernel and an autograd formula), so
they work with autograd and ``torch.compile(fullgraph=True)``, and eager calls do not load the compiler. The forward
streams each vocabulary row once (online log-sum-exp) and saves only O(N) tensors (plus a reference to the logits);
the backward writes ``(onehot - softmax) * g / T`` into a new tensor or, with ``inplace_backward=True``, into the
logits buffer itself (no second ``[N, V]`` tensor; the caller must not need the logits afterwards; under
``torch.compile`` functionalization may copy instead).

Backends (see ``r1engine.ops.backends``): ``"torch"`` (reference), ``"cpp"`` (C++ CPU kernel), ``"cuda"``,
``"triton"``, ``"auto"`` (the fastest available for the tensors' device).
"""

from __future__ import annotations

import math

import torch

from r1engine.algo.kl import kl_estimator_id
from r1engine.algo.loss import AGGREGATIONS, GRPOMetrics, aggregation_weights, grpo_metrics, token_advantages
from r1engine.ops._library import custom_op
from r1engine.ops.backends import GRPO_LOSS, load, resolve

__all__ = ["GRPOMetrics", "grpo_loss", "token_logprobs"]

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


def _check_finite_lse(lse: torch.Tensor, weights: torch.Tensor | None) -> None:
    bad = ~torch.isfinite(lse)
    if weights is not None:
        bad &= weights != 0
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"logits: expected finite values, got NaN/+inf (or a row that is entirely -inf) in flat row {idx}; "
            "pass check_finite=False to skip this check"
        )


# ----------------------------------------------------------------------------------------------------------------
# Custom operators. Inputs are already flattened: logits [N, V], per-token vectors [N].


@custom_op("r1engine::grpo_loss", mutates_args=())
def _grpo_loss_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    beta: float,
    kl_estimator: int,
    backend: str,
    inplace_backward: bool,
    check_finite: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_targets_range(targets, logits.shape[1])
    if check_finite:  # here, inside the op: data-dependent checks do not break a torch.compile graph
        check_finite_inputs(weights, advantages=advantages, old_logprobs=old_logp, ref_logprobs=ref_logp)
    loss_tok, logp, lse, dlogp, ratio, kl, clipped = load(backend).grpo_fwd(
        logits,
        targets,
        advantages,
        old_logp,
        ref_logp,
        weights,
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        beta=beta,
        kl_estimator=kl_estimator,
    )
    if check_finite:
        _check_finite_lse(lse, weights)
    return loss_tok.sum(), logp, lse, dlogp, ratio, kl, clipped


@_grpo_loss_op.register_fake
def _(logits, targets, advantages, old_logp, ref_logp, weights, *args):
    n = logits.shape[0]
    vec = [logits.new_empty((n,), dtype=torch.float32) for _ in range(6)]
    return (logits.new_empty((), dtype=torch.float32), *vec)


def _grpo_setup_context(ctx, inputs, output):
    logits, targets = inputs[0], inputs[1]
    temperature, backend, inplace = inputs[6], inputs[12], inputs[13]
    _, logp, lse, dlogp, ratio, kl, clipped = output
    ctx.save_for_backward(logits, targets, lse, dlogp)
    ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace
    ctx.mark_non_differentiable(logp, lse, dlogp, ratio, kl, clipped)


def _grpo_backward(ctx, grad_loss, *unused):
    logits, targets, lse, dlogp = ctx.saved_tensors
    g = dlogp * grad_loss.float()
    grad = _logits_grad(logits, targets, lse, g, ctx.temperature, ctx.backend, ctx.inplace)
    return (grad,) + (None,) * 14


_grpo_loss_op.register_autograd(_grpo_backward, setup_context=_grpo_setup_context)


@custom_op("r1engine::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, backend: str, check_finite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_targets_range(targets, logits.shape[1])
    logp, lse = load(backend).token_logprobs_fwd(logits, targets, temperature)
    if check_finite:
        _check_finite_lse(lse, None)
    return logp, lse


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, backend, check_finite):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _token_logprobs_setup_context(ctx, inputs, output):
    logits, targets, temperature, backend, _ = inputs
    logp, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(lse)


def _token_logprobs_backward(ctx, grad_logp, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    grad = _logits_grad(logits, targets, lse, grad_logp.float().contiguous(), ctx.temperature, ctx.backend, False)
    return grad, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup_context)


@custom_op("r1engine::logprobs_backward", mutates_args=())
def _logprobs_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    return load(backend).logprobs_bwd(logits, targets, lse, dlogp, temperature=temperature, inplace=False)


@_logprobs_backward_op.register_fake
def _(logits, targets, lse, dlogp, temperature, backend):
    return torch.empty_like(logits)


@custom_op("r1engine::logprobs_backward_inplace", mutates_args=("logits",))
def _logprobs_backward_inplace_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    temperature: float,
    backend: str,
) -> None:
    load(backend).logprobs_bwd(logits, targets, lse, dlogp, temperature=temperature, inplace=True)


@_logprobs_backward_inplace_op.register_fake
def _(logits, targets, lse, dlogp, temperature, backend):
    return None


def _logits_grad(logits, targets, lse, dlogp, temperature, backend, inplace):
    if inplace:
        _logprobs_backward_inplace_op(logits, targets, lse, dlogp, temperature, backend)
        return logits
    return _logprobs_backward_op(logits, targets, lse, dlogp, temperature, backend)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def check_hyperparameters(*, eps_low: float, eps_high: float, dual_clip: float | None, beta: float, temperature: float):
    """The loss's scalar settings, each named when it is NaN, infinite or out of range."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a positive finite float, got {temperature!r}")
    if not (eps_low >= 0 and eps_high >= 0 and math.isfinite(eps_low) and math.isfinite(eps_high)):
        raise ValueError(f"eps_low/eps_high: expected finite values >= 0, got {eps_low!r}/{eps_high!r}")
    if dual_clip is not None and dual_clip != 0 and not (dual_clip > 1.0 and math.isfinite(dual_clip)):
        raise ValueError(f"dual_clip: expected None, 0 (off) or a finite value > 1, got {dual_clip!r}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta: expected a finite value >= 0, got {beta!r}")


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


def _check_like(name: str, t: torch.Tensor | None, shape: tuple[int, ...], what: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} ({what}), got {list(t.shape)}")


def _check_targets_dtype(targets: torch.Tensor) -> None:
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
    _check_like("targets", targets, tuple(logits.shape[:-1]), "logits.shape[:-1]")
    _check_targets_dtype(targets)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature!r}")
    flat = _flat_rows(logits)
    logp, _ = _token_logprobs_op(
        flat, targets.reshape(-1).long().contiguous(), float(temperature), backend_name, bool(check_finite)
    )
    return logp.reshape(targets.shape)


def grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_estimator: str | int = "k3",
    temperature: float = 1.0,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    segment_ids: torch.Tensor | None = None,
    advantages_per: str | None = None,
    inplace_backward: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, GRPOMetrics]:
    """The GRPO policy loss (0-d fp32, differentiable w.r.t. ``logits``) and its metrics, fused on the logits.

    Shapes: padded ``logits [B, T, V]`` with ``targets, mask, old_logprobs, ref_logprobs [B, T]`` and
    ``advantages [B]`` (per sequence) or ``[B, T]`` (per token); or packed ``logits [N, V]`` with per-token
    ``[N]`` tensors, ``advantages [N]`` or, with ``segment_ids [N]`` (each token's sequence index in ``[0, S)``),
    ``advantages [S]``; ``advantages_per`` ("token" | "sequence") says which where the shape cannot (N = S, see
    ``r1engine.algo.loss.token_advantages``). ``segment_ids`` also defines the sequences for the per-sequence
    aggregations; without it, packed tokens count as one sequence.

    Math (see ``r1engine.algo.loss``): clipped surrogate with ``eps_low``/``eps_high`` and optional ``dual_clip``
    (> 1), KL penalty ``beta * kl_estimator`` ("k1"|"k2"|"k3") against ``ref_logprobs``, aggregation ``agg``
    (``"seq-mean-token-mean"``, ``"token-mean"``, ``"seq-mean-token-sum-norm"`` with horizon ``max_len``).
    ``old_logprobs=None`` is an on-policy step (ratio 1). Masked tokens cost nothing in the fused kernels.
    ``inplace_backward=True`` writes the logits gradient into ``logits``; ``check_finite`` raises on NaN/inf logits.
    Logits whose leading dims cannot be flattened without a copy (e.g. the view ``logits[:, :-1]``) are copied
    once; to avoid that, pass the full logits and mask the last position (masked rows cost nothing).
    """
    GRPO_LOSS.validate(backend)
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: expected one of {AGGREGATIONS}, got {agg!r}")
    kl_id = kl_estimator_id(kl_estimator)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    backend_name = resolve(backend, logits.device)
    _check_logits(logits, backend_name)
    tok_shape = tuple(logits.shape[:-1])
    what = "logits.shape[:-1]"
    _check_like("targets", targets, tok_shape, what)
    _check_targets_dtype(targets)
    _check_like("mask", mask, tok_shape, what)
    _check_like("old_logprobs", old_logprobs, tok_shape, what)
    _check_like("ref_logprobs", ref_logprobs, tok_shape, what)
    check_hyperparameters(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta, temperature=temperature)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages: expected a torch.Tensor, got {type(advantages).__name__}")

    if logits.dim() == 3:
        if segment_ids is not None:
            raise ValueError("segment_ids: only valid with packed logits [N, V], got logits [B, T, V]")
        b, t = tok_shape
        if tuple(advantages.shape) == (b,):
            adv = advantages.float()[:, None].expand(b, t)
        elif tuple(advantages.shape) == (b, t):
            adv = advantages.float()
        else:
            raise ValueError(
                f"advantages: expected shape [{b}] (per sequence) or [{b}, {t}] (per token), got "
                f"{list(advantages.shape)}"
            )
    else:
        (n,) = tok_shape
        if segment_ids is not None:
            _check_like("segment_ids", segment_ids, tok_shape, what)
            if segment_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"segment_ids: expected an integer tensor, got {segment_ids.dtype}")
        adv = token_advantages(advantages.float(), n, segment_ids, advantages_per)

    weights = aggregation_weights(mask, agg, max_len=max_len, segment_ids=segment_ids)
    flat = _flat_rows(logits)
    fl = lambda x: None if x is None else x.reshape(-1).float().contiguous()  # noqa: E731
    loss, _logp, _lse, _dlogp, ratio, kl, clipped = _grpo_loss_op(
        flat,
        targets.reshape(-1).long().contiguous(),
        fl(adv),
        fl(old_logprobs),
        fl(ref_logprobs),
        fl(weights),
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip or 0.0),
        float(beta),
        kl_id,
        backend_name,
        bool(inplace_backward),
        bool(check_finite),
    )
    return loss, grpo_metrics(ratio, kl, clipped, mask.reshape(-1))
