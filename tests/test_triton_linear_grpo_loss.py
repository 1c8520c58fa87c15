"""The lm_head-fused GRPO loss (`r1engine.ops.linear_grpo_loss`, Triton and chunked-torch backends) against the
autograd reference on materialized logits (`r1engine.algo.loss.grpo_loss_reference(hidden @ weight.T, ...)`).

Without a CUDA device the Triton kernels run under TRITON_INTERPRET=1 (set here before triton is imported) at small
sizes; with one, the GPU grid at the bottom also runs.
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

from r1engine.kernels import linear_grpo_loss as LK  # noqa: E402

LG = importlib.import_module("r1engine.ops.linear_grpo_loss")  # the module (the package exports the function)
from r1engine.algo.loss import grpo_loss_reference  # noqa: E402
from r1engine.ops.linear_grpo_loss import linear_grpo_loss  # noqa: E402

if not HAS_CUDA and type(LK._fwd_kernel).__name__ != "InterpretedFunction":
    LK = importlib.reload(LK)  # imported earlier in this process without the interpreter switch

DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.triton_interp
DTYPES = [torch.float32, torch.bfloat16]


def _fp32_logp(hidden, weight, targets, t):
    z = (hidden.float() @ weight.float().T) / t
    return torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)


def _problem(b, t, h, v, dtype, seed, *, packed=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.75
    mask[0] = False  # a sequence with no completion tokens
    mask[-1, : t // 2] = False  # a prompt prefix
    adv = torch.randn(b, generator=g)
    lp = _fp32_logp(hidden, weight, targets, 0.8)
    old = lp + 0.3 * torch.randn(b, t, generator=g)
    ref = lp + 0.3 * torch.randn(b, t, generator=g)
    out = dict(hidden=hidden, weight=weight, targets=targets, adv=adv, mask=mask, old=old, ref=ref)
    return {k: val.to(DEV) for k, val in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# kernel level


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h,v,splits", [(45, 48, 123, 4), (70, 32, 300, 1), (9, 40, 97, 3)])
def test_linear_logprobs_fwd_bwd_match_fp32_autograd(dtype, m, h, v, splits):
    g = torch.Generator().manual_seed(m + v)
    x = torch.randn(m, h, generator=g).to(dtype).to(DEV)
    w = (torch.randn(v, h, generator=g) * 0.4).to(dtype).to(DEV)
    tg = torch.randint(0, v, (m,), generator=g).to(DEV)
    temp = 0.7
    logp, lse = LK.linear_logprobs_fwd(x, w, tg, temp, min_programs=splits * triton.cdiv(m, 16))
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    z = (xr @ wr.T) / temp
    rlogp = torch.log_softmax(z, -1).gather(1, tg[:, None]).squeeze(1)
    torch.testing.assert_close(logp, rlogp.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1).detach(), atol=2e-5, rtol=2e-5)
    gl = torch.randn(m, generator=g).to(DEV)
    gl[::4] = 0.0  # rows without gradient (clipped tokens) are dropped before any GEMM
    (rlogp * gl).sum().backward()
    dx, dw = LK.linear_logprobs_bwd(x, w, tg, lse, gl, temp)
    assert dx.dtype == dtype and dw.dtype == dtype
    assert torch.all(dx[::4] == 0)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx.float(), xr.grad, **tol)
    torch.testing.assert_close(dw.float(), wr.grad, **tol)


def _fp32_reference(x, w, tg, temp):
    """fp32 autograd leaves and (logp, lse, entropy) of log_softmax(x @ w.T / T)."""
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    z = (xr @ wr.T) / temp
    logsm = torch.log_softmax(z, -1)
    rlogp = logsm.gather(1, tg[:, None]).squeeze(1)
    rent = -(logsm.exp() * logsm).sum(-1)
    return xr, wr, rlogp, torch.logsumexp(z, -1).detach(), rent


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h,v,splits", [(45, 48, 123, 4), (70, 32, 300, 1), (9, 40, 97, 3)])
def test_linear_logprobs_entropy_fwd_bwd_match_fp32_autograd(dtype, m, h, v, splits):
    # The optional entropy output (online over the vocabulary tiles, combined over the splits) and the gradient of
    # sum(grad_logp * logp + dentropy * entropy), with rows where either, both or neither gradient is 0.
    g = torch.Generator().manual_seed(3 * m + v)
    x = torch.randn(m, h, generator=g).to(dtype).to(DEV)
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype).to(DEV)
    tg = torch.randint(0, v, (m,), generator=g).to(DEV)
    temp = 0.8
    min_programs = splits * triton.cdiv(m, 16)
    logp, lse, ent = LK.linear_logprobs_fwd(x, w, tg, temp, min_programs=min_programs, entropy=True)
    xr, wr, rlogp, rlse, rent = _fp32_reference(x, w, tg, temp)
    torch.testing.assert_close(logp, rlogp.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, rlse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent, rent.detach(), atol=2e-5, rtol=2e-5)
    # without the entropy: the same (logp, lse), two outputs as before
    out = LK.linear_logprobs_fwd(x, w, tg, temp, min_programs=min_programs)
    assert len(out) == 2
    torch.testing.assert_close(out[0], logp, atol=0, rtol=0)
    torch.testing.assert_close(out[1], lse, atol=0, rtol=0)
    gl = torch.randn(m, generator=g).to(DEV)
    ge = torch.randn(m, generator=g).to(DEV)
    gl[::3] = 0.0
    ge[::2] = 0.0  # rows 0, 6, 12, ...: both 0, dropped before any GEMM
    ((rlogp * gl).sum() + (rent * ge).sum()).backward()
    dx, dw = LK.linear_logprobs_bwd(x, w, tg, lse, gl, temp, dentropy=ge, entropy=ent)
    assert dx.dtype == dtype and dw.dtype == dtype
    assert torch.all(dx[::6] == 0)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx.float(), xr.grad, **tol)
    torch.testing.assert_close(dw.float(), wr.grad, **tol)
    # dentropy all 0: the plain gradient of the log-probs
    dx0, dw0 = LK.linear_logprobs_bwd(x, w, tg, lse, gl, temp, dentropy=torch.zeros_like(ge), entropy=ent)
    dx1, dw1 = LK.linear_logprobs_bwd(x, w, tg, lse, gl, temp)
    torch.testing.assert_close(dx0, dx1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw0, dw1, atol=1e-6, rtol=1e-5)


def test_linear_logprobs_entropy_argument_errors_and_empty():
    x = torch.randn(0, 16, device=DEV)
    w = torch.randn(30, 16, device=DEV)
    tg = torch.zeros(0, dtype=torch.long, device=DEV)
    out = LK.linear_logprobs_fwd(x, w, tg, 1.0, entropy=True)
    assert len(out) == 3 and all(t.shape == (0,) for t in out)
    x = torch.randn(4, 16, device=DEV)
    tg = torch.zeros(4, dtype=torch.long, device=DEV)
    vec = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="dentropy and entropy must be given together"):
        LK.linear_logprobs_bwd(x, w, tg, vec, vec, 1.0, dentropy=vec)


def test_grouped_order_and_vocab_splits_cover_every_tile():
    # GPU-style launch (several vocabulary tiles per forward program, grouped program order with a ragged last
    # group, several backward chunks) on interpreter-sized tiles: every (token block, vocab tile) pair must be
    # visited exactly once.
    cfg = LK.TileConfig(16, 32, 16, 1, 1, group_m=3, tiles_per_split=2, chunk_bytes=70 * 2 * 64)
    g = torch.Generator().manual_seed(5)
    m, h, v = 70, 32, 300
    x = torch.randn(m, h, generator=g).to(DEV)
    w = (torch.randn(v, h, generator=g) * 0.4).to(DEV)
    tg = torch.randint(0, v, (m,), generator=g).to(DEV)
    logp, lse = LK.linear_logprobs_fwd(x, w, tg, 1.0, config=cfg)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    z = xr @ wr.T
    rlogp = torch.log_softmax(z, -1).gather(1, tg[:, None]).squeeze(1)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1).detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(logp, rlogp.detach(), atol=2e-5, rtol=2e-5)
    gl = torch.randn(m, generator=g).to(DEV)
    (rlogp * gl).sum().backward()
    dx, dw = LK.linear_logprobs_bwd(x, w, tg, lse, gl, 1.0, config=cfg)
    torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, wr.grad, atol=1e-5, rtol=1e-4)
    # the entropy over the same splits and chunks
    _, lse_e, ent = LK.linear_logprobs_fwd(x, w, tg, 1.0, config=cfg, entropy=True)
    xr, wr, rlogp, _, rent = _fp32_reference(x, w, tg, 1.0)
    torch.testing.assert_close(lse_e, lse, atol=0, rtol=0)
    torch.testing.assert_close(ent, rent.detach(), atol=2e-5, rtol=2e-5)
    ge = torch.randn(m, generator=g).to(DEV)
    ((rlogp * gl).sum() + (rent * ge).sum()).backward()
    dx, dw = LK.linear_logprobs_bwd(x, w, tg, lse, gl, 1.0, config=cfg, dentropy=ge, entropy=ent)
    torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, wr.grad, atol=1e-5, rtol=1e-4)


def test_padded_vocabulary_columns_never_count():
    # Strongly negative logits: a zero-filled padded column would add exp(0 - max) to the sum per padded lane.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=g).to(DEV)
    w = torch.randn(33, 32, generator=g).to(DEV)  # V = 33 with 32-wide tiles: 31 padded lanes in the last tile
    b = x @ w.T
    x2 = torch.cat([x, torch.ones(20, 1, device=DEV)], 1)
    w2 = torch.cat([w, torch.full((33, 1), -60.0, device=DEV)], 1)  # logits shifted to about -60
    tg = torch.randint(0, 33, (20,), generator=g).to(DEV)
    logp, lse = LK.linear_logprobs_fwd(x2, w2, tg, 1.0)
    torch.testing.assert_close(lse, torch.logsumexp(b - 60.0, -1), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(logp, torch.log_softmax(b, -1).gather(1, tg[:, None]).squeeze(1), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the public op


CASES = [
    # (agg, old, ref, beta, kl, dual_clip)
    ("seq-mean-token-mean", True, True, 0.05, "k3", 3.0),
    ("token-mean", False, True, 0.1, "k2", None),
    ("seq-mean-token-sum-norm", True, False, 0.0, "k3", 2.0),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_linear_grpo_loss_matches_reference_on_logits(backend, dtype, case):
    agg, use_old, use_ref, beta, kl, dual_clip = case
    p = _problem(4, 13, 48, 123, dtype, seed=len(agg) + int(beta * 100))
    hp = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, beta=beta, kl_estimator=kl, temperature=0.8, agg=agg)
    old = p["old"] if use_old else None
    ref = p["ref"] if use_ref else None
    x = p["hidden"].detach().float().requires_grad_()
    w = p["weight"].detach().float().requires_grad_()
    rloss, rmet = grpo_loss_reference(x @ w.T, p["targets"], p["adv"], p["mask"], old, ref, **hp)
    rloss.backward()
    xb = p["hidden"].detach().clone().requires_grad_()
    wb = p["weight"].detach().clone().requires_grad_()
    loss, met = linear_grpo_loss(xb, wb, p["targets"], p["adv"], p["mask"], old, ref, backend=backend, **hp)
    loss.backward()
    torch.testing.assert_close(loss, rloss.detach(), atol=1e-5, rtol=1e-4)
    for name in ("clip_frac", "kl_mean", "ratio_mean", "num_tokens"):
        torch.testing.assert_close(getattr(met, name), getattr(rmet, name), atol=1e-5, rtol=1e-4)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-4, rtol=2e-2)
    torch.testing.assert_close(xb.grad.float(), x.grad, **tol)
    torch.testing.assert_close(wb.grad.float(), w.grad, **tol)
    assert torch.all(xb.grad[0] == 0)  # the fully masked sequence gets no gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_tokens_with_segments(backend):
    p = _problem(1, 60, 32, 130, torch.float32, seed=4)
    x, w = p["hidden"][0], p["weight"]
    seg = torch.arange(60, device=DEV) // 17  # 4 packed sequences
    adv = torch.randn(4, generator=torch.Generator().manual_seed(0)).to(DEV)
    mask = p["mask"][0]
    hp = dict(beta=0.1, kl_estimator="k1", temperature=1.1, agg="seq-mean-token-mean", segment_ids=seg)
    xr = x.detach().clone().requires_grad_()
    rloss, _ = grpo_loss_reference(xr @ w.T, p["targets"][0], adv, mask, p["old"][0], p["ref"][0], **hp)
    rloss.backward()
    xb = x.detach().clone().requires_grad_()
    loss, _ = linear_grpo_loss(xb, w, p["targets"][0], adv, mask, p["old"][0], p["ref"][0], backend=backend, **hp)
    loss.backward()
    torch.testing.assert_close(loss, rloss.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xb.grad, xr.grad, atol=1e-6, rtol=1e-4)


def test_torch_backend_chunks_tokens(monkeypatch):
    p = _problem(3, 20, 32, 123, torch.float32, seed=8)
    args = (p["targets"], p["adv"], p["mask"], p["old"], p["ref"])
    hp = dict(beta=0.05, temperature=0.9)
    grads = []
    for chunk_bytes in (LG._TORCH_CHUNK_BYTES, 4 * 123 * 7):  # one chunk, then 7-token chunks
        monkeypatch.setattr(LG, "_TORCH_CHUNK_BYTES", chunk_bytes)
        x = p["hidden"].detach().clone().requires_grad_()
        loss, _ = linear_grpo_loss(x, p["weight"], *args, backend="torch", **hp)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=1e-5)


def test_triton_backward_is_deterministic():
    p = _problem(3, 16, 32, 123, torch.bfloat16, seed=12)
    outs = []
    for _ in range(2):
        x = p["hidden"].detach().clone().requires_grad_()
        w = p["weight"].detach().clone().requires_grad_()
        loss, _ = linear_grpo_loss(x, w, p["targets"], p["adv"], p["mask"], p["old"], backend="triton")
        loss.backward()
        outs.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_works_under_torch_compile():
    p = _problem(3, 11, 32, 97, torch.float32, seed=21)

    def f(x, w):
        loss, met = linear_grpo_loss(
            x, w, p["targets"], p["adv"], p["mask"], p["old"], p["ref"], beta=0.1, temperature=0.9, backend="torch"
        )
        return loss * 2.0, met.clip_frac

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        x = p["hidden"].detach().clone().requires_grad_()
        w = p["weight"].detach().clone().requires_grad_()
        loss, clip = fn(x, w)
        loss.backward()
        results.append((loss.detach(), clip, x.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_opcheck_of_the_custom_ops():
    p = _problem(2, 8, 16, 40, torch.float32, seed=3)
    x, w = p["hidden"].reshape(-1, 16), p["weight"]
    tg = p["targets"].reshape(-1)
    live = p["mask"].reshape(-1).float()
    n = x.shape[0]
    utils = ("test_schema", "test_faketensor")
    for entropy in (False, True):
        torch.library.opcheck(
            torch.ops.r1engine.linear_logprobs.default, (x, w, tg, live, 1.0, entropy, "torch"), test_utils=utils
        )
    lse = torch.zeros(n, device=DEV)
    g = live / 5
    for ge in (None, live / 7):
        ent = None if ge is None else torch.ones(n, device=DEV)
        torch.library.opcheck(
            torch.ops.r1engine.linear_logprobs_bwd.default, (x, w, tg, lse, g, ge, ent, 1.0, "torch"), test_utils=utils
        )


def test_bad_inputs_are_rejected_with_clear_errors():
    p = _problem(2, 5, 16, 30, torch.float32, seed=1)
    a = (p["targets"], p["adv"], p["mask"])
    with pytest.raises(ValueError, match=r"weight: expected \[V, H=16\]"):
        linear_grpo_loss(p["hidden"], p["weight"][:, :8], *a)
    with pytest.raises(ValueError, match="weight: expected dtype"):
        linear_grpo_loss(p["hidden"], p["weight"].double(), *a)
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, 30\)"):
        linear_grpo_loss(p["hidden"], p["weight"], p["targets"] + 30, p["adv"], p["mask"])
    with pytest.raises(ValueError, match="mask: expected shape"):
        linear_grpo_loss(p["hidden"], p["weight"], p["targets"], p["adv"], p["mask"][:, :3])
    with pytest.raises(ValueError, match="backend"):
        linear_grpo_loss(p["hidden"], p["weight"], *a, backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# GPU grid (runs on a CUDA machine only)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [123, 32000, 151936])
@pytest.mark.parametrize("n_tok", [1024, 8192])
def test_gpu_grid_triton_vs_torch(dtype, v, n_tok):
    h = 256
    p = _problem(n_tok // 512, 512, h, v, dtype, seed=v + n_tok)
    p["mask"][1] = False  # an empty row
    hp = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.04, temperature=0.7)
    res = []
    for backend in ("torch", "triton"):
        x = p["hidden"].detach().clone().requires_grad_()
        w = p["weight"].detach().clone().requires_grad_()
        loss, met = linear_grpo_loss(x, w, p["targets"], p["adv"], p["mask"], p["old"], p["ref"], backend=backend, **hp)
        loss.backward()
        res.append((loss.detach(), met.kl_mean, x.grad.float(), w.grad.float()))
    tol = dict(atol=1e-5, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-3, rtol=3e-2)
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, **tol)
