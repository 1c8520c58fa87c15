"""The Triton logits-in GRPO loss (`r1engine.kernels.grpo_loss`) against the pure-PyTorch reference backend.

Without a CUDA device the kernels run under TRITON_INTERPRET=1 (set here before triton is imported) at small sizes;
with one, the GPU grid at the bottom also runs (V up to 151936, T up to 8k, masks with empty rows).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from r1engine.kernels import grpo_loss as K  # noqa: E402

from r1engine.ops.backends import torch_ref as R  # noqa: E402

if not HAS_CUDA and type(K._grpo_fwd_kernel).__name__ != "InterpretedFunction":
    K = importlib.reload(K)  # imported earlier in this process without the interpreter switch

DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.triton_interp

DTYPES = [torch.float32, torch.bfloat16]
# (N, V, block_v): one tile; several tiles with a partial last tile; a single valid lane in the last tile
SHAPES = [(67, 123, None), (40, 300, 128), (33, 257, 64)]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}


def _case(n: int, v: int, dtype: torch.dtype, seed: int, *, masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3 + 1).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    lp, _ = R.token_logprobs_fwd(logits, targets, 1.0)
    old = lp + 0.4 * torch.randn(n, generator=g)  # ratios spread on both sides of the clip range
    ref = lp + 0.4 * torch.randn(n, generator=g)
    weights = torch.rand(n, generator=g) + 0.1
    if masked:
        weights[torch.rand(n, generator=g) < 0.3] = 0.0
        weights[:3] = 0.0
    to = dict(device=DEV)
    return logits.to(**to), targets.to(**to), adv.to(**to), old.to(**to), ref.to(**to), weights.to(**to)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,block_v,temperature", [(*s, t) for s, t in zip(SHAPES, (1.0, 0.7, 1.3), strict=True)])
def test_token_logprobs_matches_reference(dtype, n, v, block_v, temperature):
    logits, targets, *_ = _case(n, v, dtype, seed=n + v)
    logp, lse = K.token_logprobs_fwd(logits, targets, temperature, block_v=block_v)
    rlogp, rlse = R.token_logprobs_fwd(logits, targets, temperature)
    torch.testing.assert_close(logp, rlogp, **TOL[dtype])
    torch.testing.assert_close(lse, rlse, **TOL[dtype])


def test_tail_lanes_are_masked_with_minus_inf():
    # Very negative logits: a tail tile padded with 0 instead of -inf would add ~exp(0 - max) per padded lane and
    # shift lse by whole units (verl's reward-collapse bug). V = 130 with 128-lane tiles leaves 126 padded lanes.
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 130, generator=g) - 40.0).to(DEV)
    targets = torch.randint(0, 130, (16,), generator=g).to(DEV)
    logp, lse = K.token_logprobs_fwd(logits, targets, 1.0, block_v=128)
    rlogp, rlse = R.token_logprobs_fwd(logits, targets, 1.0)
    torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(logp, rlogp, atol=1e-5, rtol=1e-6)


CONFIGS = [
    # (has_old, has_ref, beta, kl_estimator, dual_clip)
    (True, True, 0.1, 3, 0.0),
    (True, True, 0.05, 1, 3.0),
    (True, True, 0.2, 2, 1.5),
    (False, True, 0.1, 3, 0.0),  # on-policy: ratio 1
    (True, False, 0.0, 3, 2.0),  # no reference
    (True, True, 0.0, 3, 0.0),  # beta 0: kl reported as 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg,shape", [(c, SHAPES[i % 2]) for i, c in enumerate(CONFIGS)])
def test_grpo_fwd_and_bwd_match_reference(dtype, cfg, shape):
    n, v, block_v = shape
    has_old, has_ref, beta, kl_est, dual_clip = cfg
    logits, targets, adv, old, ref, weights = _case(n, v, dtype, seed=7 * n + kl_est)
    old = old if has_old else None
    ref = ref if has_ref else None
    hp = dict(temperature=0.9, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, beta=beta, kl_estimator=kl_est)
    out = K.grpo_fwd(logits, targets, adv, old, ref, weights, block_v=block_v, **hp)
    ref_out = R.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    names = ("loss_tok", "logp", "lse", "dlogp", "ratio", "kl", "clipped")
    for name, a, b in zip(names, out, ref_out, strict=True):
        assert a.dtype == torch.float32 and a.shape == (n,), name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    if has_old:
        assert out[6].sum() > 0, "the case should exercise the clip"
    skipped = weights == 0
    assert torch.all(out[0][skipped] == 0) and torch.all(out[4][skipped] == 1)
    lse, dlogp = out[2], out[3]
    grad = K.logprobs_bwd(logits, targets, lse, dlogp, temperature=0.9, inplace=False, block_v=block_v)
    rgrad = R.logprobs_bwd(logits, targets, lse, dlogp, temperature=0.9, inplace=False)
    assert grad.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad, rgrad, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_equals_autograd_of_the_loss(dtype):
    n, v, t = 45, 200, 0.8
    logits, targets, adv, old, ref, weights = _case(n, v, dtype, seed=3)
    hp = dict(temperature=t, eps_low=0.2, eps_high=0.2, dual_clip=3.0, beta=0.04, kl_estimator=3)
    out = K.grpo_fwd(logits, targets, adv, old, ref, weights, block_v=64, **hp)
    grad = K.logprobs_bwd(logits, targets, out[2], out[3], temperature=t, inplace=False, block_v=64)
    x = logits.float().detach().requires_grad_()
    logp = torch.log_softmax(x / t, dim=-1).gather(1, targets[:, None]).squeeze(1)
    loss_tok = R.grpo_token_terms(logp, adv, old, ref, weights, **{k: hp[k] for k in hp if k != "temperature"})[0]
    # grpo_token_terms returns the analytic loss; differentiate the same formula through autograd instead:
    ratio = torch.exp(logp - old)
    s = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    s = torch.where(adv < 0, torch.maximum(s, 3.0 * adv), s)
    d = ref - logp
    auto_loss = (weights * (-s + 0.04 * (torch.exp(d) - d - 1))).sum()
    torch.testing.assert_close(auto_loss, loss_tok.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0].sum(), auto_loss.detach(), atol=1e-4, rtol=1e-4)
    auto_loss.backward()
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad.float(), x.grad, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_overwrites_logits(dtype):
    logits, targets, adv, old, ref, weights = _case(50, 123, dtype, seed=11)
    hp = dict(temperature=1.3, eps_low=0.2, eps_high=0.2, dual_clip=0.0, beta=0.1, kl_estimator=3)
    out = K.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    expected = K.logprobs_bwd(logits, targets, out[2], out[3], temperature=1.3, inplace=False)
    buf = logits.clone()
    res = K.logprobs_bwd(buf, targets, out[2], out[3], temperature=1.3, inplace=True)
    assert res.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, expected)


def test_masked_rows_are_not_read():
    # Rows with weight 0 (forward) and dlogp 0 (backward) hold NaN: they must not leak into any output.
    logits, targets, adv, old, ref, weights = _case(40, 123, torch.float32, seed=5)
    logits[weights == 0] = float("nan")
    hp = dict(temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=0.0, beta=0.1, kl_estimator=3)
    out = K.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    for t in out:
        assert torch.isfinite(t).all()
    grad = K.logprobs_bwd(logits, targets, out[2], out[3], temperature=1.0, inplace=False)
    assert torch.all(grad[weights == 0] == 0)
    assert torch.isfinite(grad).all()


def test_empty_and_all_masked_inputs():
    logits = torch.randn(0, 50, device=DEV)
    targets = torch.zeros(0, dtype=torch.long, device=DEV)
    empty = torch.zeros(0, device=DEV)
    out = K.grpo_fwd(logits, targets, empty, None, None, empty)
    assert all(t.shape == (0,) for t in out)
    logits, targets, adv, old, ref, weights = _case(12, 50, torch.float32, seed=2)
    out = K.grpo_fwd(logits, targets, adv, old, ref, torch.zeros_like(weights), beta=0.1)
    assert torch.all(out[0] == 0) and torch.all(out[3] == 0) and torch.all(out[4] == 1)


def test_bad_inputs_are_rejected_with_clear_errors():
    logits = torch.randn(4, 10, device=DEV)
    targets = torch.zeros(4, dtype=torch.long, device=DEV)
    vec = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        K.token_logprobs_fwd(logits[None], targets, 1.0)
    with pytest.raises(ValueError, match="targets must be int64"):
        K.token_logprobs_fwd(logits, targets.int(), 1.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        K.token_logprobs_fwd(logits, targets + 10, 1.0)
    with pytest.raises(ValueError, match="advantages must have shape"):
        K.grpo_fwd(logits, targets, vec[:3], None, None, vec)
    with pytest.raises(ValueError, match="kl_estimator must be 1, 2 or 3"):
        K.grpo_fwd(logits, targets, vec, None, None, vec, kl_estimator=4)


def test_reachable_through_the_backend_switch():
    from r1engine.ops.backends import load

    assert load("triton") is K or load("triton").grpo_fwd.__module__ == K.__name__
    logits, targets, adv, old, ref, weights = _case(20, 123, torch.bfloat16, seed=9)
    hp = dict(temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=0.0, beta=0.1, kl_estimator=2)
    out = load("triton").grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    torch.testing.assert_close(out[0], R.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_public_grpo_loss_with_triton_backend(dtype, inplace):
    from r1engine.ops import grpo_loss

    g = torch.Generator().manual_seed(17)
    b, t, v = 3, 11, 123
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype).to(DEV)
    targets = torch.randint(0, v, (b, t), generator=g).to(DEV)
    mask = (torch.rand(b, t, generator=g) < 0.8).to(DEV)
    mask[1] = False  # an empty sequence
    adv = torch.randn(b, generator=g).to(DEV)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    old = lp + 0.3 * torch.randn(b, t, generator=g).to(DEV)
    ref = lp + 0.3 * torch.randn(b, t, generator=g).to(DEV)
    res = []
    for backend in ("torch", "triton"):
        x = logits.detach().clone().requires_grad_()
        loss, met = grpo_loss(
            x,
            targets,
            adv,
            mask,
            old,
            ref,
            beta=0.04,
            dual_clip=3.0,
            temperature=0.9,
            backend=backend,
            inplace_backward=inplace and backend == "triton",
        )
        loss.backward()
        res.append((loss.detach(), met.clip_frac, met.kl_mean, x.grad.float()))
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-4, rtol=1.6e-2)
    for a, b_ in zip(*res, strict=True):
        torch.testing.assert_close(a, b_, **tol)


# ---------------------------------------------------------------------------------------------------------------
# GPU grid (runs on a CUDA machine only)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [123, 32000, 151936])
@pytest.mark.parametrize("n", [1000, 8192])
def test_gpu_grid(dtype, v, n):
    if n * v * 4 > 6e9:
        n = int(6e9 // (4 * v))  # keep the fp32 reference copy within a few GB
    logits, targets, adv, old, ref, weights = _case(n, v, dtype, seed=v + n)
    weights[n // 2 : n // 2 + 64] = 0.0  # a run of empty rows
    hp = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.04, kl_estimator=3)
    out = K.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    ref_out = R.grpo_fwd(logits, targets, adv, old, ref, weights, **hp)
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    grad = K.logprobs_bwd(logits, targets, out[2], out[3], temperature=0.7, inplace=False)
    rgrad = R.logprobs_bwd(logits, targets, out[2], out[3], temperature=0.7, inplace=False)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad, rgrad, **tol)
    buf = logits.clone()
    K.logprobs_bwd(buf, targets, out[2], out[3], temperature=0.7, inplace=True)
    assert torch.equal(buf, grad)


def _n_compiled(kernel) -> int:
    """Number of compiled specializations of a JIT kernel (triton's per-device kernel caches)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_new_hyperparameters_do_not_recompile():
    logits, targets, adv, old, ref, weights = _case(256, 1000, torch.bfloat16, seed=0)
    K.grpo_fwd(logits, targets, adv, old, ref, weights, eps_low=0.2, eps_high=0.2, beta=0.1, temperature=1.0)
    before = _n_compiled(K._grpo_fwd_kernel)
    for eps, beta, t in [(0.1, 0.01, 0.7), (0.3, 0.5, 1.3), (0.25, 1.0, 1.0)]:
        K.grpo_fwd(logits, targets, adv, old, ref, weights, eps_low=eps, eps_high=eps, beta=beta, temperature=t)
    assert _n_compiled(K._grpo_fwd_kernel) == before
