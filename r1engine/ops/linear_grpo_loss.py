"""GRPO loss fused with the lm_head: hidden states and the head weight in, loss and metrics out.

`linear_grpo_loss(hidden, weight, ...)` has the semantics of `r1engine.ops.grpo_loss` applied to
`logits = hidden @ weight.T`, but never holds the [N, V] logits:

* backend "triton" (`r1engine.kernels.linear_grpo_loss`): tile GEMM + online log-sum-exp in the forward, logit tiles
  recomputed in the backward, dX / dW accumulated in fp32 without atomics (deterministic);
* backend "torch": a chunked pure-PyTorch reference (chunks of tokens, logits in fp32 one chunk at a time, gradients
  recomputed per chunk), the oracle in tests and the path on CPU;
* "auto": triton on CUDA tensors when triton imports, else torch.

Only tokens with a non-zero aggregation weight are computed (they are compacted first), so prompt and padding tokens
cost nothing. The op is one `torch.library` operator (`r1engine::linear_grpo_fwd`, registered by
`r1engine.ops._library`, with a fake implementation and an autograd formula that calls `r1engine::linear_grpo_bwd`),
so it works under autograd and `torch.compile`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r1engine.ops._library import custom_op
from r1engine.ops.backends import LINEAR_GRPO_LOSS
from r1engine.ops.grpo_loss import check_finite_inputs, check_hyperparameters

if TYPE_CHECKING:
    from r1engine.algo.loss import GRPOMetrics

__all__ = ["linear_grpo_loss", "LINEAR_BACKENDS"]

LINEAR_BACKENDS = LINEAR_GRPO_LOSS.names
_TORCH_CHUNK_BYTES = 256 << 20  # fp32 logits per chunk of the torch backend


# ---------------------------------------------------------------------------------------------------------------
# backends: (logp, lse) forward and (dX, dW) backward on compacted tokens


def _torch_chunk_rows(v: int) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (4 * max(1, v)))


def _torch_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    m, v = hidden.shape[0], weight.shape[0]
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    wf = weight.float()
    step = _torch_chunk_rows(v)
    for i in range(0, m, step):
        z = (hidden[i : i + step].float() @ wf.T) / temperature
        lse[i : i + step] = torch.logsumexp(z, dim=-1)
        logp[i : i + step] = z.gather(1, targets[i : i + step, None]).squeeze(1) - lse[i : i + step]
    return logp, lse


def _torch_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    m, v = hidden.shape[0], weight.shape[0]
    dx = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    wf = weight.float()
    step = _torch_chunk_rows(v)
    for i in range(0, m, step):
        g = grad_logp[i : i + step].float()
        if not bool((g != 0).any()):
            continue
        xf = hidden[i : i + step].float()
        p = torch.exp((xf @ wf.T) / temperature - lse[i : i + step, None])
        gl = -p * (g / temperature)[:, None]
        gl.scatter_add_(1, targets[i : i + step, None], (g / temperature)[:, None])
        dx[i : i + step] = gl @ wf
        dw.addmm_(gl.T, xf)
    return dx.to(hidden.dtype), dw.to(weight.dtype)


def _resolve(backend: str, device: torch.device) -> str:
    return LINEAR_GRPO_LOSS.resolve(backend, device)


def _logprobs_fwd(hidden, weight, targets, temperature, backend):
    if backend == "triton":
        from r1engine.kernels.linear_grpo_loss import linear_logprobs_fwd

        return linear_logprobs_fwd(hidden, weight, targets, temperature)
    return _torch_logprobs_fwd(hidden, weight, targets, temperature)


def _logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature, backend):
    if backend == "triton":
        from r1engine.kernels.linear_grpo_loss import linear_logprobs_bwd

        return linear_logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature)
    return _torch_logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature)


# ---------------------------------------------------------------------------------------------------------------
# the custom ops


@custom_op("r1engine::linear_grpo_fwd", mutates_args=())
def _linear_grpo_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_tok, logp, ratio, kl, clipped, lse, dlogp), fp32 [N]; rows with weight 0 are not computed (all 0,
    ratio 1)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    if n and (int(targets.min()) < 0 or int(targets.max()) >= v):  # checked here, eagerly, also under torch.compile
        raise ValueError(f"targets: expected ids in [0, {v}), got [{int(targets.min())}, {int(targets.max())}]")
    check_finite_inputs(weights, advantages=advantages, old_logprobs=old_logp, ref_logprobs=ref_logp)
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    live = torch.nonzero(weights != 0).squeeze(1)
    if live.numel():
        lp, ls = _logprobs_fwd(
            hidden.index_select(0, live).contiguous(),
            weight.contiguous(),
            targets.index_select(0, live).contiguous(),
            temperature,
            backend,
        )
        logp.index_copy_(0, live, lp)
        lse.index_copy_(0, live, ls)
    from r1engine.ops.backends.torch_ref import grpo_token_terms

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
    return loss_tok, logp, ratio, kl, clipped, lse, dlogp


@_linear_grpo_fwd.register_fake
def _(hidden, weight, targets, advantages, old_logp, ref_logp, weights, *args):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(7))


@custom_op("r1engine::linear_grpo_bwd", mutates_args=())
def _linear_grpo_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [N, H], dW [V, H]) for d loss / d logp = grad_logp; rows with grad_logp == 0 are not computed."""
    live = torch.nonzero(grad_logp != 0).squeeze(1)
    dx = torch.zeros_like(hidden)
    if live.numel() == 0:
        return dx, torch.zeros_like(weight)
    dx_live, dw = _logprobs_bwd(
        hidden.index_select(0, live).contiguous(),
        weight.contiguous(),
        targets.index_select(0, live).contiguous(),
        lse.index_select(0, live).contiguous(),
        grad_logp.index_select(0, live).contiguous(),
        temperature,
        backend,
    )
    dx.index_copy_(0, live, dx_live)
    return dx, dw


@_linear_grpo_bwd.register_fake
def _(hidden, weight, targets, lse, grad_logp, temperature, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets = inputs[0], inputs[1], inputs[2]
    weights = inputs[6]
    ctx.temperature = inputs[7]
    ctx.backend = inputs[13]
    lse, dlogp = output[5], output[6]
    ctx.save_for_backward(hidden, weight, targets, weights, lse, dlogp)
    ctx.mark_non_differentiable(output[2], output[3], output[4], output[5], output[6])


def _backward(ctx, g_loss, g_logp, g_ratio, g_kl, g_clipped, g_lse, g_dlogp):
    hidden, weight, targets, weights, lse, dlogp = ctx.saved_tensors
    g = torch.zeros_like(dlogp) if g_loss is None else g_loss * dlogp
    if g_logp is not None:
        g = g + torch.where(weights != 0, g_logp, torch.zeros_like(g_logp))
    dx, dw = _linear_grpo_bwd(hidden, weight, targets, lse, g.float().contiguous(), ctx.temperature, ctx.backend)
    return dx, dw, None, None, None, None, None, None, None, None, None, None, None, None


_linear_grpo_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the public entry


def _as_tokens(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per token); got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")
    return t.reshape(-1).float()


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    backend: str = "auto",
) -> tuple[torch.Tensor, GRPOMetrics]:
    """GRPO loss of ``logits = hidden @ weight.T`` without materializing the logits.

    Same arguments and result as ``r1engine.algo.loss.grpo_loss_reference`` / ``r1engine.ops.grpo_loss`` with the
    logits replaced by ``hidden`` and ``weight``:

    * ``hidden [B, T, H]`` with ``targets/mask/old/ref [B, T]`` and ``advantages [B]`` or ``[B, T]``; or packed
      ``hidden [N, H]`` with per-token ``[N]`` tensors and ``advantages [N]`` (or ``[S]`` with ``segment_ids``;
      ``advantages_per`` says which where the shape cannot).
    * ``weight [V, H]``: the lm_head weight, same dtype (fp32 or bf16); both ``hidden`` and ``weight`` get
      gradients (fp32-accumulated, deterministic).
    * ``mask``: 1 on completion tokens; tokens with 0 are never computed. ``agg``/``max_len``/``segment_ids``: see
      ``r1engine.algo.loss.aggregation_weights``.
    * ``old_logprobs=None``: on-policy (ratio 1); ``ref_logprobs=None`` or ``beta=0``: no KL term.
    * ``backend``: "auto" (triton on CUDA when available, else torch), "torch" or "triton".

    Returns ``(loss, GRPOMetrics)`` (clip fraction, mean KL, mean ratio, token count; detached).
    """
    from r1engine.algo.kl import kl_estimator_id
    from r1engine.algo.loss import aggregation_weights, grpo_metrics, token_advantages

    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (like hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device} (like hidden), got {weight.device}")
    check_hyperparameters(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta, temperature=temperature)
    tok_shape = tuple(hidden.shape[:-1])
    dev = hidden.device
    if tuple(targets.shape) != tok_shape:
        raise ValueError(f"targets: expected shape {tok_shape}, got {tuple(targets.shape)}")
    if tuple(mask.shape) != tok_shape:
        raise ValueError(f"mask: expected shape {tok_shape}, got {tuple(mask.shape)}")
    adv = advantages
    if mask.dim() == 2 and adv.dim() == 1 and adv.shape[0] == mask.shape[0]:
        adv = adv[:, None].expand(tok_shape)
    elif mask.dim() == 1:
        adv = token_advantages(adv, mask.shape[0], segment_ids, advantages_per)
    adv = _as_tokens("advantages", adv, tok_shape, dev)
    old = _as_tokens("old_logprobs", old_logprobs, tok_shape, dev)
    ref = _as_tokens("ref_logprobs", ref_logprobs, tok_shape, dev)
    weights = aggregation_weights(mask, agg, max_len=max_len, segment_ids=segment_ids).reshape(-1).contiguous()
    be = _resolve(backend, dev)
    loss_tok, logp, ratio, kl, clipped, _, _ = _linear_grpo_fwd(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        adv.contiguous(),
        None if old is None else old.contiguous(),
        None if ref is None else ref.contiguous(),
        weights,
        float(temperature),
        float(eps_low),
        float(eps_high),
        float(dual_clip or 0.0),
        float(beta),
        kl_estimator_id(kl_estimator),
        be,
    )
    m = mask.reshape(-1)
    return loss_tok.sum(), grpo_metrics(ratio, kl, clipped, m)
