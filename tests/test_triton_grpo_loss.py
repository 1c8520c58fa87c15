"""The Triton vocabulary passes (`r1engine.kernels.grpo_loss`: `logprobs_fwd`, `logprobs_bwd`) against the pure-PyTorch
oracle `r1engine.ops.backends.torch_ref`.

Without a CUDA device the kernels run under TRITON_INTERPRET=1 (set here before triton is imported) at small sizes;
with one, the GPU grid at the bottom also runs (V up to 151936, live masks with runs of empty rows).
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

if not HAS_CUDA and type(K._logprobs_fwd_kernel).__name__ != "InterpretedFunction":
    K = importlib.reload(K)  # imported earlier in this process without the interpreter switch

DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.triton_interp

DTYPES = [torch.float32, torch.bfloat16]
# (N, V, block_v, temperature): one tile; several tiles with a partial last tile; a single valid lane in the last
# tile; V not a power of two and far above the tile
SHAPES = [(67, 123, None, 1.0), (40, 300, 128, 0.7), (33, 257, 64, 1.3), (21, 1000, 128, 0.9)]
FWD_TOL = dict(atol=2e-5, rtol=1e-5)
BWD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2)}
NEG_INF = float("-inf")


def _case(n: int, v: int, dtype: torch.dtype, seed: int, *, block: int = 64):
    """Logits with -inf entries in a few live rows (some, never all, of a row), targets on finite logits, and a live
    mask with zeros."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3 + 1
    targets = torch.randint(0, v, (n,), generator=g)
    logits[3, ::3] = NEG_INF  # every third logit
    targets[3] = 1
    logits[4, : min(block, v - 1)] = NEG_INF  # a whole first tile
    targets[4] = v - 1
    logits[5, 1:] = NEG_INF  # a single finite logit: p = 1 there, entropy 0
    targets[5] = 0
    live = (torch.rand(n, generator=g) > 0.3).float()
    live[:3] = 0.0
    live[3:6] = 1.0
    return logits.to(dtype).to(DEV), targets.to(DEV), live.to(DEV)


def _grads(n: int, seed: int, live: torch.Tensor):
    """dlogp and dentropy with zeros (0 on rows that are not live, as the loss gives; both 0 on some live rows)."""
    g = torch.Generator().manual_seed(seed)
    dlogp = torch.randn(n, generator=g)
    dent = torch.randn(n, generator=g)
    dlogp[torch.arange(n) % 3 == 1] = 0.0
    dent[torch.arange(n) % 2 == 1] = 0.0
    dlogp, dent = dlogp.to(DEV), dent.to(DEV)
    return dlogp * (live != 0), dent * (live != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,block_v,temperature", SHAPES)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("use_live", [False, True])
def test_logprobs_fwd_matches_reference(dtype, n, v, block_v, temperature, entropy, use_live):
    logits, targets, live = _case(n, v, dtype, seed=n + v, block=block_v or K.default_block_v(v))
    live = live if use_live else None
    out = K.logprobs_fwd(logits, targets, temperature=temperature, live=live, entropy=entropy, block_v=block_v)
    ref = R.logprobs_fwd(logits, targets, temperature=temperature, live=live, entropy=entropy)
    for name, a, b in zip(("logp", "lse", "entropy"), out, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == (n,), name
        assert not torch.isnan(a).any(), name  # in particular the entropy of rows with some -inf logits
        torch.testing.assert_close(a, b, **FWD_TOL, msg=lambda m, name=name: f"{name}: {m}")
    logp, lse, ent = out
    if use_live:
        skipped = live == 0
        assert torch.all(logp[skipped] == 0) and torch.all(lse[skipped] == 0) and torch.all(ent[skipped] == 0)
    if entropy:
        assert abs(float(ent[5])) < 1e-6  # one finite logit: a point mass
        assert torch.all(ent > -1e-5)
    else:
        assert torch.all(ent == 0)


def test_entropy_of_known_distributions():
    # uniform over V: log V; uniform over the finite half of the row (the rest -inf): log(V / 2); large logits
    v = 300
    logits = torch.zeros(3, v, device=DEV)
    logits[1, 1::2] = NEG_INF
    logits[2] = torch.arange(v, dtype=torch.float32, device=DEV) * 0.01 + 50.0  # large logits: no cancellation
    targets = torch.zeros(3, dtype=torch.long, device=DEV)
    _, lse, ent = K.logprobs_fwd(logits, targets, temperature=1.0, entropy=True, block_v=64)
    v_t = torch.tensor(float(v))
    torch.testing.assert_close(ent[0], torch.log(v_t).to(DEV), atol=2e-6, rtol=0)
    torch.testing.assert_close(ent[1], torch.log(v_t / 2).to(DEV), atol=2e-6, rtol=0)
    # against float64: the shifted running sum (z - max) avoids the cancellation of lse - E_p[z] (~53 each)
    logsm = torch.log_softmax(logits[2].double(), -1)
    torch.testing.assert_close(ent[2].double(), -(logsm.exp() * logsm).sum(), atol=1e-6, rtol=0)


def test_tail_lanes_are_masked_with_minus_inf():
    # Very negative logits: a tail tile padded with 0 instead of -inf would add ~exp(0 - max) per padded lane and
    # shift lse by whole units (verl's reward-collapse bug). V = 130 with 128-lane tiles leaves 126 padded lanes.
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 130, generator=g) - 40.0).to(DEV)
    targets = torch.randint(0, 130, (16,), generator=g).to(DEV)
    out = K.logprobs_fwd(logits, targets, temperature=1.0, entropy=True, block_v=128)
    ref = R.logprobs_fwd(logits, targets, temperature=1.0, entropy=True)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,block_v,temperature", SHAPES)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_bwd_matches_reference(dtype, n, v, block_v, temperature, with_entropy):
    logits, targets, live = _case(n, v, dtype, seed=3 * n + v, block=block_v or K.default_block_v(v))
    _, lse, ent = R.logprobs_fwd(logits, targets, temperature=temperature, live=live, entropy=True)
    dlogp, dent = _grads(n, seed=v, live=live)
    extra = dict(dentropy=dent, entropy=ent) if with_entropy else {}
    grad = K.logprobs_bwd(logits, targets, lse, dlogp, temperature=temperature, inplace=False, block_v=block_v, **extra)
    rgrad = R.logprobs_bwd(logits, targets, lse, dlogp, temperature=temperature, inplace=False, **extra)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.isfinite(grad).all()  # -inf logits (p = 0) give 0, never NaN
    torch.testing.assert_close(grad, rgrad, **BWD_TOL[dtype])
    zero_rows = (dlogp == 0) & ((dent == 0) if with_entropy else True)
    assert torch.all(grad[zero_rows] == 0)
    # in place: the same values, written over the logits
    buf = logits.clone()
    res = K.logprobs_bwd(buf, targets, lse, dlogp, temperature=temperature, inplace=True, block_v=block_v, **extra)
    assert res.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_equals_autograd(dtype):
    # d/dlogits of sum(dlogp * logp + dentropy * entropy) through autograd in fp32, on finite logits
    n, v, t = 45, 200, 0.8
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype).to(DEV)
    targets = torch.randint(0, v, (n,), generator=g).to(DEV)
    dlogp, dent = _grads(n, seed=4, live=torch.ones(n, device=DEV))
    logp, lse, ent = K.logprobs_fwd(logits, targets, temperature=t, entropy=True, block_v=64)
    grad = K.logprobs_bwd(logits, targets, lse, dlogp, temperature=t, inplace=False, dentropy=dent, entropy=ent)
    x = logits.float().detach().requires_grad_()
    logsm = torch.log_softmax(x / t, dim=-1)
    rlogp = logsm.gather(1, targets[:, None]).squeeze(1)
    rent = -(logsm.exp() * logsm).sum(-1)
    torch.testing.assert_close(logp, rlogp.detach(), **FWD_TOL)
    torch.testing.assert_close(ent, rent.detach(), **FWD_TOL)
    ((dlogp * rlogp).sum() + (dent * rent).sum()).backward()
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=1.6e-2)
    torch.testing.assert_close(grad.float(), x.grad, **tol)


def test_rows_that_are_not_live_are_not_read():
    # Rows with live 0 (forward) and dlogp = dentropy = 0 (backward) hold NaN: they must not leak into any output.
    logits, targets, live = _case(40, 123, torch.float32, seed=5)
    logits[live == 0] = float("nan")
    logp, lse, ent = K.logprobs_fwd(logits, targets, temperature=1.0, live=live, entropy=True)
    for t in (logp, lse, ent):
        assert torch.isfinite(t).all()
    dlogp, dent = _grads(40, seed=6, live=live)
    grad = K.logprobs_bwd(logits, targets, lse, dlogp, temperature=1.0, inplace=False, dentropy=dent, entropy=ent)
    assert torch.all(grad[live == 0] == 0)
    assert torch.isfinite(grad).all()


def test_empty_and_all_dead_inputs():
    logits = torch.randn(0, 50, device=DEV)
    targets = torch.zeros(0, dtype=torch.long, device=DEV)
    empty = torch.zeros(0, device=DEV)
    out = K.logprobs_fwd(logits, targets, temperature=1.0, live=empty, entropy=True)
    assert all(t.shape == (0,) for t in out)
    grad = K.logprobs_bwd(logits, targets, empty, empty, temperature=1.0, inplace=False, dentropy=empty, entropy=empty)
    assert grad.shape == (0, 50)
    logits, targets, _ = _case(12, 50, torch.float32, seed=2)
    out = K.logprobs_fwd(logits, targets, temperature=1.0, live=torch.zeros(12, device=DEV), entropy=True)
    assert all(torch.all(t == 0) for t in out)
    zeros = torch.zeros(12, device=DEV)
    grad = K.logprobs_bwd(logits, targets, out[1], zeros, temperature=1.0, inplace=True, dentropy=zeros, entropy=zeros)
    assert torch.all(grad == 0) and grad.data_ptr() == logits.data_ptr()


def test_bad_inputs_are_rejected_with_clear_errors():
    logits = torch.randn(4, 10, device=DEV)
    targets = torch.zeros(4, dtype=torch.long, device=DEV)
    vec = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        K.logprobs_fwd(logits[None], targets, temperature=1.0)
    with pytest.raises(ValueError, match="targets must be int64"):
        K.logprobs_fwd(logits, targets.int(), temperature=1.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        K.logprobs_fwd(logits, targets + 10, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        K.logprobs_fwd(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="live must have shape"):
        K.logprobs_fwd(logits, targets, temperature=1.0, live=vec[:3])
    with pytest.raises(ValueError, match="dlogp must have shape"):
        K.logprobs_bwd(logits, targets, vec, vec[:3], temperature=1.0, inplace=False)
    with pytest.raises(ValueError, match="dentropy and entropy must be given together"):
        K.logprobs_bwd(logits, targets, vec, vec, temperature=1.0, inplace=False, dentropy=vec)
    with pytest.raises(ValueError, match="entropy must have shape"):
        K.logprobs_bwd(logits, targets, vec, vec, temperature=1.0, inplace=False, dentropy=vec, entropy=vec[:2])


def test_reachable_through_the_backend_switch():
    from r1engine.ops.backends import load

    backend = load("triton")
    assert backend.logprobs_fwd.__module__ == K.__name__ and backend.logprobs_bwd.__module__ == K.__name__
    logits, targets, live = _case(20, 123, torch.bfloat16, seed=9)
    out = backend.logprobs_fwd(logits, targets, temperature=0.9, live=live, entropy=True)
    ref = R.logprobs_fwd(logits, targets, temperature=0.9, live=live, entropy=True)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **FWD_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_public_grpo_loss_with_triton_backend(dtype, inplace):
    # End to end through r1engine.ops.grpo_loss (KL and an entropy bonus, so both vocabulary-pass terms are used).
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
        loss, _ = grpo_loss(
            x,
            targets,
            adv,
            mask,
            old,
            ref,
            beta=0.04,
            dual_clip=3.0,
            entropy_coef=0.01,
            temperature=0.9,
            backend=backend,
            inplace_backward=inplace and backend == "triton",
        )
        loss.backward()
        res.append((loss.detach(), x.grad.float()))
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
    logits, targets, live = _case(n, v, dtype, seed=v + n, block=K.default_block_v(v))
    live[n // 2 : n // 2 + 64] = 0.0  # a run of empty rows
    t = 0.7
    out = K.logprobs_fwd(logits, targets, temperature=t, live=live, entropy=True)
    ref = R.logprobs_fwd(logits, targets, temperature=t, live=live, entropy=True)
    for a, b in zip(out, ref, strict=True):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    _, lse, ent = ref
    dlogp, dent = _grads(n, seed=v, live=live)
    for extra in ({}, dict(dentropy=dent, entropy=ent)):
        grad = K.logprobs_bwd(logits, targets, lse, dlogp, temperature=t, inplace=False, **extra)
        rgrad = R.logprobs_bwd(logits, targets, lse, dlogp, temperature=t, inplace=False, **extra)
        assert torch.isfinite(grad).all()
        tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)
        torch.testing.assert_close(grad, rgrad, **tol)
        buf = logits.clone()
        K.logprobs_bwd(buf, targets, lse, dlogp, temperature=t, inplace=True, **extra)
        assert torch.equal(buf, grad)


def _n_compiled(kernel) -> int:
    """Number of compiled specializations of a JIT kernel (triton's per-device kernel caches)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_new_temperature_does_not_recompile():
    logits, targets, live = _case(256, 1000, torch.bfloat16, seed=0)
    lse = K.logprobs_fwd(logits, targets, temperature=1.0, live=live, entropy=True)[1]
    dlogp = torch.ones(256, device=DEV)
    K.logprobs_bwd(logits, targets, lse, dlogp, temperature=1.0, inplace=False)
    before = (_n_compiled(K._logprobs_fwd_kernel), _n_compiled(K._logprobs_bwd_kernel))
    for t in (0.7, 1.3, 0.95):
        K.logprobs_fwd(logits, targets, temperature=t, live=live, entropy=True)
        K.logprobs_bwd(logits, targets, lse, dlogp, temperature=t, inplace=False)
    assert (_n_compiled(K._logprobs_fwd_kernel), _n_compiled(K._logprobs_bwd_kernel)) == before
