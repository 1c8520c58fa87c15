"""The CUDA logits-in GRPO loss (`csrc/cuda/grpo_loss.cu`, reached as torch.ops.r1engine.* on CUDA tensors and as
backend "cuda") against the pure-PyTorch reference. Needs a CUDA GPU and an extension built with CUDA."""

from __future__ import annotations

import pytest
import torch

from r1engine import _ext
from r1engine.ops.backends import torch_ref as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _require_cuda_build():
    if not (_ext.cuda_compiled() and _ext.has_op("grpo_fwd")):
        pytest.fail("a CUDA GPU is present but r1engine._C was built without CUDA: rebuild with a CUDA toolkit")


def _case(n, v, dtype, seed, *, offset=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n * v + offset, generator=g) * 3 + 1).to(dtype)
    logits = base[offset:].view(n, v)  # offset != 0: row starts not 16-byte aligned (scalar path)
    targets = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    lp, _ = R.token_logprobs_fwd(logits, targets, 1.0)
    old = lp + 0.4 * torch.randn(n, generator=g)
    ref = lp + 0.4 * torch.randn(n, generator=g)
    weights = torch.rand(n, generator=g) + 0.1
    weights[torch.rand(n, generator=g) < 0.3] = 0.0
    weights[:5] = 0.0
    return [t.cuda() for t in (logits, targets, adv, old, ref, weights)]


GRID = [(v, n) for v in (123, 130, 4096, 32000, 151936) for n in (257, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,n", GRID)
@pytest.mark.parametrize("offset", [0, 3])
def test_cuda_matches_reference(dtype, v, n, offset):
    _require_cuda_build()
    logits, targets, adv, old, ref, weights = _case(n, v, dtype, seed=v + n, offset=offset)
    logits = logits.contiguous() if offset == 0 else logits
    t = 0.7
    logp, lse = torch.ops.r1engine.token_logprobs_fwd(logits, targets, t)
    rlogp, rlse = R.token_logprobs_fwd(logits, targets, t)
    torch.testing.assert_close(logp, rlogp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-5)
    for kl_est, dual, beta, use_old in [(3, 3.0, 0.04, True), (1, 0.0, 0.1, False), (2, 1.5, 0.0, True)]:
        o = old if use_old else None
        args = (t, 0.2, 0.28, dual, beta, kl_est)
        out = torch.ops.r1engine.grpo_fwd(logits, targets, adv, o, ref, weights, *args)
        rout = R.grpo_fwd(
            logits,
            targets,
            adv,
            o,
            ref,
            weights,
            temperature=t,
            eps_low=0.2,
            eps_high=0.28,
            dual_clip=dual,
            beta=beta,
            kl_estimator=kl_est,
        )
        for a, b in zip(out, rout, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    grad = torch.ops.r1engine.logprobs_bwd(logits, targets, out[2], out[3], t)
    rgrad = R.logprobs_bwd(logits, targets, out[2], out[3], temperature=t, inplace=False)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad, rgrad, **tol)
    assert torch.all(grad[weights == 0] == 0)
    buf = logits.clone()
    torch.ops.r1engine.logprobs_bwd_(buf, targets, out[2], out[3], t)
    assert torch.equal(buf, grad)


def test_cuda_skips_masked_rows():
    _require_cuda_build()
    logits, targets, adv, old, ref, weights = _case(300, 5000, torch.bfloat16, seed=1)
    logits[weights == 0] = float("nan")
    out = torch.ops.r1engine.grpo_fwd(logits, targets, adv, old, ref, weights, 1.0, 0.2, 0.2, 0.0, 0.1, 3)
    assert all(torch.isfinite(o).all() for o in out)
    grad = torch.ops.r1engine.logprobs_bwd(logits, targets, out[2], out[3], 1.0)
    assert torch.isfinite(grad).all() and torch.all(grad[weights == 0] == 0)


def test_cuda_backend_through_public_op():
    _require_cuda_build()
    ops = pytest.importorskip("r1engine.ops")
    if not hasattr(ops, "grpo_loss"):
        pytest.fail("r1engine.ops.grpo_loss is missing")
    logits, targets, adv, old, ref, weights = _case(512, 32000, torch.bfloat16, seed=2)
    mask = weights != 0
    res = []
    for backend in ("torch", "cuda"):
        x = logits.detach().clone().requires_grad_()
        loss, _ = ops.grpo_loss(x, targets, adv, mask, old, ref, beta=0.04, backend=backend)
        loss.backward()
        res.append((loss.detach(), x.grad.float()))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res[0][1], res[1][1], atol=1e-3, rtol=1.6e-2)
