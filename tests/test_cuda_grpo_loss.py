"""The CUDA vocabulary passes (`csrc/cuda/grpo_loss.cu`, reached as torch.ops.r1engine.logprobs_fwd / logprobs_bwd /
logprobs_bwd_ on CUDA tensors and as backend "cuda") against the pure-PyTorch oracle
`r1engine.ops.backends.torch_ref`. Needs a CUDA GPU and an extension built with CUDA."""

from __future__ import annotations

import pytest
import torch

from r1engine import _ext
from r1engine.ops.backends import torch_ref as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEG_INF = float("-inf")


def _require_cuda_build():
    if not (_ext.cuda_compiled() and _ext.has_op("logprobs_fwd") and _ext.has_op("logprobs_bwd_")):
        pytest.fail("a CUDA GPU is present but r1engine._C was built without CUDA: rebuild with a CUDA toolkit")


def _case(n, v, dtype, seed, *, offset=0):
    """Logits (offset != 0: row starts not 16-byte aligned, the scalar path), targets, a live mask with zeros, and
    -inf logits in a few live rows (some, never all, of a row)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n * v + offset, generator=g) * 3 + 1
    logits = base[offset:].view(n, v)
    targets = torch.randint(0, v, (n,), generator=g)
    logits[3, ::3] = NEG_INF  # every third logit
    targets[3] = 1
    logits[4, : v // 2] = NEG_INF  # the first half
    targets[4] = v - 1
    logits[5, 1:] = NEG_INF  # one finite logit: entropy 0
    targets[5] = 0
    live = (torch.rand(n, generator=g) > 0.3).float()
    live[:3] = 0.0
    live[3:6] = 1.0
    base = base.to(dtype).cuda()
    logits = base[offset:].view(n, v)
    return logits, targets.cuda(), live.cuda()


def _grads(n, seed, live):
    """dlogp and dentropy with zeros (0 on rows that are not live, as the loss gives; both 0 on some live rows)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n)
    dlogp = torch.randn(n, generator=g).masked_fill(idx % 3 == 1, 0.0).cuda()
    dent = torch.randn(n, generator=g).masked_fill(idx % 2 == 1, 0.0).cuda()
    keep = live != 0
    return dlogp * keep, dent * keep


def _bwd_tol(dtype):
    return dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)


GRID = [(v, n) for v in (123, 130, 4096, 32000, 151936) for n in (257, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,n", GRID)
@pytest.mark.parametrize("offset", [0, 3])
def test_cuda_matches_reference(dtype, v, n, offset):
    _require_cuda_build()
    logits, targets, live = _case(n, v, dtype, seed=v + n, offset=offset)
    t = 0.7
    for use_live in (False, True):
        for entropy in (False, True):
            lv = live if use_live else None
            out = torch.ops.r1engine.logprobs_fwd(logits, targets, lv, t, entropy)
            ref = R.logprobs_fwd(logits, targets, temperature=t, live=lv, entropy=entropy)
            for name, a, b in zip(("logp", "lse", "entropy"), out, ref, strict=True):
                assert a.dtype == torch.float32 and a.shape == (n,), name
                assert not torch.isnan(a).any(), name  # the entropy of rows with some -inf logits in particular
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
            if use_live:
                assert all(torch.all(o[live == 0] == 0) for o in out)
            if not entropy:
                assert torch.all(out[2] == 0)
    _, lse, ent = R.logprobs_fwd(logits, targets, temperature=t, live=live, entropy=True)
    dlogp, dent = _grads(n, seed=v, live=live)
    for ent_args in ((None, None), (dent, ent)):
        grad = torch.ops.r1engine.logprobs_bwd(logits, targets, lse, dlogp, *ent_args, t)
        extra = {} if ent_args[0] is None else dict(dentropy=dent, entropy=ent)
        rgrad = R.logprobs_bwd(logits, targets, lse, dlogp, temperature=t, inplace=False, **extra)
        assert grad.dtype == dtype and grad.is_contiguous()
        assert torch.isfinite(grad).all()  # -inf logits (p = 0) give 0, never NaN
        torch.testing.assert_close(grad, rgrad, **_bwd_tol(dtype))
        both_zero = (dlogp == 0) & ((dent == 0) if ent_args[0] is not None else True)
        assert torch.all(grad[both_zero] == 0)
        buf = logits.clone()
        torch.ops.r1engine.logprobs_bwd_(buf, targets, lse, dlogp, *ent_args, t)
        assert torch.equal(buf, grad)


def test_cuda_strided_rows():
    # rows further apart than V (a slice of wider logits): stride(0) != V, no vector loads
    _require_cuda_build()
    n, v = 300, 5000
    wide, targets, live = _case(n, v + 5, torch.bfloat16, seed=4)
    logits = wide[:, :v]
    targets = targets.clamp(max=v - 1)
    out = torch.ops.r1engine.logprobs_fwd(logits, targets, live, 1.1, True)
    ref = R.logprobs_fwd(logits, targets, temperature=1.1, live=live, entropy=True)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dlogp, dent = _grads(n, seed=5, live=live)
    grad = torch.ops.r1engine.logprobs_bwd(logits, targets, out[1], dlogp, dent, out[2], 1.1)
    extra = dict(dentropy=dent, entropy=out[2])
    rgrad = R.logprobs_bwd(logits, targets, out[1], dlogp, temperature=1.1, inplace=False, **extra)
    torch.testing.assert_close(grad, rgrad, **_bwd_tol(torch.bfloat16))
    buf = wide.clone()
    torch.ops.r1engine.logprobs_bwd_(buf[:, :v], targets, out[1], dlogp, dent, out[2], 1.1)
    assert torch.equal(buf[:, :v], grad)
    assert torch.equal(buf[:, v:], wide[:, v:])  # the padding between rows is untouched


def test_cuda_entropy_of_known_distributions():
    _require_cuda_build()
    for v in (300, 8000):  # a warp per row, a block per row
        logits = torch.zeros(3, v, device="cuda")
        logits[1, 1::2] = NEG_INF
        logits[2] = torch.arange(v, dtype=torch.float32, device="cuda") * (3.0 / v) + 50.0  # large logits
        targets = torch.zeros(3, dtype=torch.long, device="cuda")
        _, _, ent = torch.ops.r1engine.logprobs_fwd(logits, targets, None, 1.0, True)
        v_t = torch.tensor(float(v), dtype=torch.float64)
        torch.testing.assert_close(ent[0].double().cpu(), torch.log(v_t), atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[1].double().cpu(), torch.log(v_t / 2), atol=1e-5, rtol=0)
        logsm = torch.log_softmax(logits[2].double(), -1)
        torch.testing.assert_close(ent[2].double(), -(logsm.exp() * logsm).sum(), atol=1e-5, rtol=0)


def test_cuda_rows_that_are_not_live_are_not_read():
    _require_cuda_build()
    logits, targets, live = _case(300, 5000, torch.bfloat16, seed=1)
    logits[live == 0] = float("nan")
    out = torch.ops.r1engine.logprobs_fwd(logits, targets, live, 1.0, True)
    assert all(torch.isfinite(o).all() for o in out)
    dlogp, dent = _grads(300, seed=2, live=live)
    grad = torch.ops.r1engine.logprobs_bwd(logits, targets, out[1], dlogp, dent, out[2], 1.0)
    assert torch.isfinite(grad).all() and torch.all(grad[live == 0] == 0)


def test_cuda_bad_arguments():
    _require_cuda_build()
    logits, targets, live = _case(8, 50, torch.float32, seed=0)
    vec = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        torch.ops.r1engine.logprobs_fwd(logits, targets, None, 0.0, False)
    with pytest.raises(RuntimeError, match="live must be a"):
        torch.ops.r1engine.logprobs_fwd(logits, targets, vec[:3], 1.0, False)
    with pytest.raises(RuntimeError, match="dentropy and entropy"):
        torch.ops.r1engine.logprobs_bwd(logits, targets, vec, vec, vec, None, 1.0)
    empty = torch.zeros(0, 50, device="cuda")
    out = torch.ops.r1engine.logprobs_fwd(empty, targets[:0], vec[:0], 1.0, True)
    assert all(o.shape == (0,) for o in out)


def test_cuda_backend_through_public_op():
    _require_cuda_build()
    from r1engine.ops import grpo_loss

    logits, targets, live = _case(512, 32000, torch.bfloat16, seed=2)
    logits[3:6] = torch.randn(3, 32000, device="cuda").to(torch.bfloat16)  # finite logits for the loss
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(512, generator=g).cuda()
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    old = lp + 0.3 * torch.randn(512, generator=g).cuda()
    ref = lp + 0.3 * torch.randn(512, generator=g).cuda()
    mask = live != 0
    res = []
    for backend in ("torch", "cuda"):
        x = logits.detach().clone().requires_grad_()
        loss, _ = grpo_loss(x, targets, adv, mask, old, ref, beta=0.04, entropy_coef=0.01, backend=backend)
        loss.backward()
        res.append((loss.detach(), x.grad.float()))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res[0][1], res[1][1], atol=1e-3, rtol=1.6e-2)
