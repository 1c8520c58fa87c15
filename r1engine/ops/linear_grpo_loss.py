"""GRPO loss fused with the lm_head: hidden states and the head weight in, loss and metrics out.

`linear_grpo_loss(hidden, weight, ...)` has the semantics of `r1engine.ops.grpo_loss` applied to
`logits = hidden @ weight.T`, but never holds the [N, V] logits:

* backend "triton" (`r1engine.kernels.linear_grpo_loss`): tile GEMM + online log-sum-exp in the forward, logit tiles
  recomputed in the backward, dX / dW accumulated in fp32 without atomics (deterministic);
* backend "torch": a chunked pure-PyTorch reference (chunks of tokens, logits in fp32 one chunk at a time, worked on
  in place so that at most two chunk-sized tensors are live, gradients recomputed per chunk), the oracle in tests
  and the path on CPU;
* "auto": triton on CUDA tensors when triton imports, else torch.

Only tokens in the mask are computed (they are compacted first), so prompt and padding tokens cost nothing. The
vocabulary pass is one `torch.library` operator (`r1engine::linear_logprobs`, with a fake implementation and an
autograd formula that calls `r1engine::linear_logprobs_bwd`), so it works under autograd and `torch.compile`; the
loss math between the passes is `r1engine.algo.policy_loss.policy_loss`, the same as every other loss path's.
"""

from __future__ import annotations

from typing import Any

import torch

from r1engine.algo.policy_loss import GRPOLossOutput, LossParams, policy_loss
from r1engine.ops._library import custom_op
from r1engine.ops.backends import LINEAR_GRPO_LOSS
from r1engine.ops.grpo_loss import checked_loss_inputs

__all__ = ["linear_grpo_loss", "LINEAR_BACKENDS"]

LINEAR_BACKENDS = LINEAR_GRPO_LOSS.names
_TORCH_CHUNK_BYTES = 256 << 20  # fp32 logits per chunk of the torch backend


# ---------------------------------------------------------------------------------------------------------------
# backends: (logp, lse, entropy) forward and (dX, dW) backward on compacted tokens


def _torch_chunk_rows(v: int) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (4 * max(1, v)))


def _chunk_logits(x: torch.Tensor, wf: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T of one chunk of tokens (a new tensor the caller may overwrite)."""
    z = x.float() @ wf.T
    return z if temperature == 1.0 else z.div_(temperature)


def _torch_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, v = hidden.shape[0], weight.shape[0]
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.zeros_like(logp)
    wf = weight.float()
    step = _torch_chunk_rows(v)
    for i in range(0, m, step):
        z = _chunk_logits(hidden[i : i + step], wf, temperature)
        lse[i : i + step] = torch.logsumexp(z, dim=-1)
        logp[i : i + step] = z.gather(1, targets[i : i + step, None]).squeeze(1) - lse[i : i + step]
        if entropy:
            z.sub_(lse[i : i + step, None])  # log p, in place
            ent[i : i + step] = -z.exp().mul_(z).sum(-1)
        del z  # at most two chunks live: z and one temporary
    return logp, lse, ent


def _torch_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    ent: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    m, v = hidden.shape[0], weight.shape[0]
    dx = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    wf = weight.float()
    step = _torch_chunk_rows(v)
    for i in range(0, m, step):
        g = grad_logp[i : i + step].float() / temperature
        e = grad_ent[i : i + step].float() / temperature if grad_ent is not None else None
        if not bool((g != 0).any()) and (e is None or not bool((e != 0).any())):
            continue
        xf = hidden[i : i + step].float()
        z = _chunk_logits(xf, wf, temperature).sub_(lse[i : i + step, None])  # log p
        gl = z.exp()  # p; becomes dL/dz in place: onehot * g - p * (g + e * (log p + H)) (d entropy / d z)
        if e is not None:
            z.add_(ent[i : i + step, None]).mul_(e[:, None]).add_(g[:, None])
            gl.mul_(z).neg_()
        else:
            gl.mul_(-g[:, None])
        del z  # at most two chunks live
        gl.scatter_add_(1, targets[i : i + step, None], g[:, None])
        dx[i : i + step] = gl @ wf
        dw.addmm_(gl.T, xf)
        del gl
    return dx.to(hidden.dtype), dw.to(weight.dtype)


def _triton_entropy_missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"linear_grpo_loss: the triton backend has no {what} yet; use backend='torch' or grpo_loss on the logits"
    )


def _logprobs_fwd(hidden, weight, targets, temperature, entropy, backend):
    if backend == "triton":
        from r1engine.kernels.linear_grpo_loss import linear_logprobs_fwd

        if not entropy:
            logp, lse = linear_logprobs_fwd(hidden, weight, targets, temperature)[:2]
            return logp, lse, torch.zeros_like(logp)
        try:
            return linear_logprobs_fwd(hidden, weight, targets, temperature, entropy=True)
        except TypeError as exc:
            raise _triton_entropy_missing("entropy") from exc
    return _torch_logprobs_fwd(hidden, weight, targets, temperature, entropy)


def _logprobs_bwd(hidden, weight, targets, lse, grad_logp, grad_ent, ent, temperature, backend):
    if backend == "triton":
        from r1engine.kernels.linear_grpo_loss import linear_logprobs_bwd

        if grad_ent is None:
            return linear_logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature)
        try:
            return linear_logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature, dentropy=grad_ent,
                                       entropy=ent)  # fmt: skip
        except TypeError as exc:
            raise _triton_entropy_missing("entropy gradient") from exc
    return _torch_logprobs_bwd(hidden, weight, targets, lse, grad_logp, grad_ent, ent, temperature)


# ---------------------------------------------------------------------------------------------------------------
# the custom ops


@custom_op("r1engine::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    live: torch.Tensor,
    temperature: float,
    entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy), fp32 [N]; rows with live == 0 are not computed (all 0)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    if n and (int(targets.min()) < 0 or int(targets.max()) >= v):  # checked here, eagerly, also under torch.compile
        raise ValueError(f"targets: expected ids in [0, {v}), got [{int(targets.min())}, {int(targets.max())}]")
    out = [torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(3)]
    rows = torch.nonzero(live != 0).squeeze(1)
    if rows.numel():
        part = _logprobs_fwd(
            hidden.index_select(0, rows).contiguous(),
            weight.contiguous(),
            targets.index_select(0, rows).contiguous(),
            temperature,
            entropy,
            backend,
        )
        for full, values in zip(out, part, strict=True):
            full.index_copy_(0, rows, values)
    return out[0], out[1], out[2]


@_linear_logprobs_op.register_fake
def _(hidden, weight, targets, live, temperature, entropy, backend):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@custom_op("r1engine::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    ent: torch.Tensor | None,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [N, H], dW [V, H]) of sum(grad_logp * logp + grad_ent * entropy); rows whose gradients are 0 are skipped."""
    active = grad_logp != 0
    if grad_ent is not None:
        active = active | (grad_ent != 0)
    rows = torch.nonzero(active).squeeze(1)
    dx = torch.zeros_like(hidden)
    if rows.numel() == 0:
        return dx, torch.zeros_like(weight)
    pick = lambda t: None if t is None else t.index_select(0, rows).contiguous()  # noqa: E731
    dx_rows, dw = _logprobs_bwd(
        pick(hidden), weight.contiguous(), pick(targets), pick(lse), pick(grad_logp), pick(grad_ent), pick(ent),
        temperature, backend,
    )  # fmt: skip
    dx.index_copy_(0, rows, dx_rows)
    return dx, dw


@_linear_logprobs_bwd.register_fake
def _(hidden, weight, targets, lse, grad_logp, grad_ent, ent, temperature, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, live, temperature, entropy, backend = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, targets, live, lse, ent)
    ctx.temperature, ctx.entropy, ctx.backend = temperature, entropy, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, targets, live, lse, ent = ctx.saved_tensors
    keep = live != 0
    g = torch.zeros_like(lse) if g_logp is None else torch.where(keep, g_logp, torch.zeros_like(g_logp))
    ge = None
    if ctx.entropy and g_ent is not None:
        ge = torch.where(keep, g_ent, torch.zeros_like(g_ent)).float().contiguous()
    dx, dw = _linear_logprobs_bwd(
        hidden, weight, targets, lse, g.float().contiguous(), ge, ent if ge is not None else None, ctx.temperature,
        ctx.backend,
    )  # fmt: skip
    return dx, dw, None, None, None, None, None


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the public entry


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    check_finite: bool = True,
    backend: str = "auto",
    **loss_settings: Any,
) -> GRPOLossOutput:
    """GRPO-family loss of ``logits = hidden @ weight.T`` without materializing the logits.

    Same arguments and result as ``r1engine.ops.grpo_loss`` (and ``r1engine.algo.loss.grpo_loss_reference``) with
    the logits replaced by ``hidden`` and ``weight``:

    * ``hidden [B, T, H]`` with ``targets/mask/old/ref/sampler [B, T]`` and ``advantages [B]`` or ``[B, T]``; or
      packed ``hidden [N, H]`` with per-token ``[N]`` tensors and ``advantages [N]`` (or ``[S]`` with
      ``segment_ids``; ``advantages_per`` says which where the shape cannot).
    * ``weight [V, H]``: the lm_head weight, same dtype (fp32 or bf16); both ``hidden`` and ``weight`` get
      gradients (fp32-accumulated, deterministic).
    * ``params`` / keyword ``loss_settings``: the loss settings (:class:`~r1engine.algo.policy_loss.LossParams`).
    * ``backend``: "auto" (triton on CUDA when available, else torch), "torch" or "triton".

    Returns ``GRPOLossOutput(loss, metrics)``.
    """
    p = LossParams.build(params, **loss_settings)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (like hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device} (like hidden), got {weight.device}")
    token_shape = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != token_shape:
        raise ValueError(f"targets: expected shape {list(token_shape)}, got {list(targets.shape)}")
    inputs = checked_loss_inputs(
        token_shape, hidden.device, advantages, mask, p, check_finite, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, sampler_logprobs=sampler_logprobs, segment_ids=segment_ids,
        advantages_per=advantages_per,
    )  # fmt: skip
    be = LINEAR_GRPO_LOSS.resolve(backend, hidden.device)
    logp, _, ent = _linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
        inputs.live.to(torch.float32).contiguous(), float(p.temperature), p.needs_entropy, be,
    )  # fmt: skip
    return policy_loss(logp, inputs, p, ent if p.needs_entropy else None)
