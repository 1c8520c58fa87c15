"""Public fused GRPO-loss ops (r1engine.ops.grpo_loss / token_logprobs): every backend against the reference."""

from __future__ import annotations

import pytest
import torch

import r1engine.ops as ops
from r1engine.algo.loss import grpo_loss_reference
from r1engine.algo.loss import token_logprobs as ref_token_logprobs
from r1engine.ops.backends import compiled, load, resolve, torch_ref

BACKENDS = ["cpp", "torch"]
AGGS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def _inputs(b, t, v, dtype, seed, *, old=True, ref=True, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2.0).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    if b > 1:
        mask[-1, : t // 2] = 0  # a prompt-like masked prefix
    adv = torch.randn(b, generator=g)
    logp = ref_token_logprobs(logits, targets, temperature)
    old_lp = (logp + 0.3 * torch.randn(b, t, generator=g)) if old else None  # ratios on both sides of the clip
    ref_lp = (logp + 0.5 * torch.randn(b, t, generator=g)) if ref else None
    return logits, targets, adv, mask, old_lp, ref_lp


def _tols(dtype):
    # loss/metrics are fp32 math on identical inputs; bf16 gradients are rounded to bf16.
    return (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2e-5)


CASES = [
    # (b, t, v, dtype, old, ref, agg, dual_clip, temperature, kl)
    (3, 47, 123, torch.float32, True, True, "seq-mean-token-mean", None, 1.0, "k3"),
    (3, 47, 123, torch.bfloat16, True, True, "token-mean", 3.0, 0.7, "k3"),
    (2, 13, 1000, torch.float32, False, True, "seq-mean-token-sum-norm", None, 0.7, "k2"),
    (2, 13, 1000, torch.bfloat16, True, False, "seq-mean-token-mean", 2.0, 1.0, "k1"),
    (2, 5, 32000, torch.float32, True, True, "token-mean", 3.0, 1.3, "k3"),
    (1, 4, 32000, torch.bfloat16, False, False, "seq-mean-token-mean", None, 1.0, "k3"),
    (1, 1, 123, torch.float32, True, True, "seq-mean-token-sum-norm", 3.0, 0.6, "k3"),
    (4, 7, 7, torch.float32, True, True, "token-mean", None, 1.0, "k1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "t", "v", "dtype", "old", "ref", "agg", "dual_clip", "temperature", "kl"), CASES)
def test_matches_reference(backend, b, t, v, dtype, old, ref, agg, dual_clip, temperature, kl):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(
        b, t, v, dtype, seed=b * 1000 + v, old=old, ref=ref, temperature=temperature
    )
    kw = dict(
        eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, beta=0.04, kl_estimator=kl, temperature=temperature, agg=agg
    )
    x = logits.clone().requires_grad_()
    loss, m = ops.grpo_loss(x, targets, adv, mask, old_lp, ref_lp, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    xr = logits.float().clone().requires_grad_()
    loss_r, m_r = grpo_loss_reference(xr, targets, adv, mask, old_lp, ref_lp, **kw)
    (grad_r,) = torch.autograd.grad(loss_r, xr)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, loss_r.detach(), rtol=1e-5, atol=1e-6)
    rtol, atol = _tols(dtype)
    torch.testing.assert_close(grad.float(), grad_r, rtol=rtol, atol=atol)
    for name in ("clip_frac", "kl_mean", "ratio_mean", "num_tokens"):
        torch.testing.assert_close(getattr(m, name), getattr(m_r, name), rtol=1e-5, atol=1e-6)
    if old and b * t >= 20:
        assert 0 < float(m.clip_frac) < 1  # the inputs exercise both branches
    assert float(grad.float().abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_overwrites_logits(dtype):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 9, 517, dtype, seed=11)
    kw = dict(beta=0.1, temperature=0.9, dual_clip=3.0)
    leaf = logits.clone().requires_grad_()
    loss, _ = ops.grpo_loss(leaf, targets, adv, mask, old_lp, ref_lp, backend="cpp", **kw)
    loss.backward()
    want = leaf.grad.clone()
    seen = {}

    leaf2 = logits.clone().requires_grad_()
    buf = leaf2 * 1  # a non-leaf, like the lm_head output
    buf.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    loss2, _ = ops.grpo_loss(buf, targets, adv, mask, old_lp, ref_lp, backend="cpp", inplace_backward=True, **kw)
    torch.testing.assert_close(loss2, loss)
    loss2.backward()
    assert seen["ptr"] == buf.data_ptr()  # the gradient is the logits buffer itself
    torch.testing.assert_close(buf.detach(), want)  # ... which now holds the gradient
    torch.testing.assert_close(leaf2.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "v", "temperature"), [(torch.float32, 123, 1.0), (torch.bfloat16, 1000, 0.7), (torch.float32, 32000, 0.6)]
)
def test_token_logprobs_values_and_grad(backend, dtype, v, temperature):
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(3, 5, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (3, 5), generator=g)
    w = torch.randn(3, 5, generator=g)
    x = logits.clone().requires_grad_()
    lp = ops.token_logprobs(x, targets, temperature, backend=backend)
    (grad,) = torch.autograd.grad((lp * w).sum(), x)
    xr = logits.float().clone().requires_grad_()
    lr = ref_token_logprobs(xr, targets, temperature)
    (grad_r,) = torch.autograd.grad((lr * w).sum(), xr)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, lr.detach(), rtol=1e-5, atol=2e-5)
    rtol, atol = _tols(dtype)
    torch.testing.assert_close(grad.float(), grad_r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_packed_tokens_with_segment_ids_match_padded(backend, agg):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(3, 11, 301, torch.float32, seed=5)
    lengths = [11, 6, 9]
    sel = torch.tensor([i * 11 + j for i in range(3) for j in range(lengths[i])])
    seg = torch.tensor([i for i in range(3) for _ in range(lengths[i])])
    kw = dict(beta=0.05, agg=agg, max_len=11, backend=backend)
    x = logits.clone().requires_grad_()
    # padded reference, with the padding tail masked
    pmask = mask.clone()
    for i, n in enumerate(lengths):
        pmask[i, n:] = 0
    loss_pad, m_pad = ops.grpo_loss(x, targets, adv, pmask, old_lp, ref_lp, **kw)
    (g_pad,) = torch.autograd.grad(loss_pad, x)
    flat = lambda z: z.reshape(-1, *z.shape[2:])[sel]  # noqa: E731
    xp = flat(logits).clone().requires_grad_()
    loss_pk, m_pk = ops.grpo_loss(
        xp, flat(targets), adv, flat(pmask), flat(old_lp), flat(ref_lp), segment_ids=seg, **kw
    )
    (g_pk,) = torch.autograd.grad(loss_pk, xp)
    torch.testing.assert_close(loss_pk, loss_pad)
    torch.testing.assert_close(g_pk, flat(g_pad))
    torch.testing.assert_close(m_pk.clip_frac, m_pad.clip_frac)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_and_grad(backend):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 6, 77, torch.float32, seed=3)
    for agg in AGGS:
        x = logits.clone().requires_grad_()
        loss, m = ops.grpo_loss(x, targets, adv, torch.zeros(2, 6), old_lp, ref_lp, beta=0.1, agg=agg, backend=backend)
        (g,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
        assert all(float(getattr(m, k)) == 0.0 for k in ("clip_frac", "kl_mean", "ratio_mean", "num_tokens"))
    # one fully masked sequence contributes nothing and does not change the others' weights
    mask[1] = 0
    l1, _ = ops.grpo_loss(logits, targets, adv, mask, old_lp, ref_lp, backend=backend)
    l2, _ = ops.grpo_loss(logits[:1], targets[:1], adv[:1], mask[:1], old_lp[:1], ref_lp[:1], backend=backend)
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_cpp_contract_matches_torch_ref(dtype, entropy):
    g = torch.Generator().manual_seed(9)
    n, v = 29, 4099
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype)
    logits[3, 100:200] = float("-inf")  # masked vocabulary entries are allowed (p = 0 there: no NaN entropy)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = 5
    live = (torch.rand(n, generator=g) > 0.2).float()
    kw = dict(temperature=0.8, live=live, entropy=entropy)
    a = torch_ref.logprobs_fwd(logits, targets, **kw)
    c = compiled.logprobs_fwd(logits, targets, **kw)
    for name, x, y in zip(("logp", "lse", "entropy"), a, c, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=2e-5, msg=name)
        assert not y[live == 0].any(), f"{name}: rows that are not live must be 0"
    assert bool(torch.isfinite(c[2]).all())
    plain = compiled.logprobs_fwd(logits, targets, temperature=0.8, live=live)
    assert torch.equal(plain[0], c[0]) and torch.equal(plain[1], c[1])  # the entropy changes no log-prob bit
    dlogp = torch.randn(n, generator=g) * live
    dlogp[::7] = 0
    dent = torch.randn(n, generator=g) * live if entropy else None
    for inplace in (False, True):
        buf = logits.clone()
        extra = dict(dentropy=dent, entropy=c[2] if entropy else None)
        ga = torch_ref.logprobs_bwd(logits, targets, c[1], dlogp, temperature=0.8, inplace=False, **extra)
        gc = compiled.logprobs_bwd(buf, targets, c[1], dlogp, temperature=0.8, inplace=inplace, **extra)
        assert gc.dtype == dtype and (gc.data_ptr() == buf.data_ptr()) == inplace
        dead = (dlogp == 0) & ((dent == 0) if dent is not None else True)
        assert not gc[dead].any()  # rows without a gradient are exact zeros
        rtol, atol = _tols(dtype)
        torch.testing.assert_close(gc.float(), ga.float(), rtol=rtol, atol=atol)


def test_entropy_gradient_matches_autograd():
    # torch_ref's closed form against autograd of the materialised entropy (the oracle of the oracle).
    from r1engine.algo.loss import token_entropy, token_logprobs

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 53, generator=g, dtype=torch.float64)
    x[2, :10] = float("-inf")
    t = torch.randint(10, 53, (7,), generator=g)
    dlogp, dent = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    ((token_logprobs(xr, t, 0.7) * dlogp).sum() + (token_entropy(xr, 0.7) * dent).sum()).backward()
    logp, lse, ent = torch_ref.logprobs_fwd(x, t, temperature=0.7, entropy=True)
    grad = torch_ref.logprobs_bwd(x, t, lse, dlogp, temperature=0.7, inplace=False, dentropy=dent, entropy=ent)
    torch.testing.assert_close(grad.float(), xr.grad.float(), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 9, 211, torch.float32, seed=21)

    def step(x):
        loss, m = ops.grpo_loss(
            x * 1.0, targets, adv, mask, old_lp, ref_lp, beta=0.05, agg="seq-mean-token-mean", backend="cpp"
        )
        lp = ops.token_logprobs(x, targets, 0.9, backend="cpp")
        return loss + 0.1 * lp.sum(), m.clip_frac

    x = logits.clone().requires_grad_()
    out, cf = torch.compile(step, fullgraph=True)(x)
    (g,) = torch.autograd.grad(out, x)
    x2 = logits.clone().requires_grad_()
    out2, cf2 = step(x2)
    (g2,) = torch.autograd.grad(out2, x2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(cf, cf2)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("name", ["advantages", "old_logprobs", "ref_logprobs", "mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_other_than_logits_are_named(name, bad):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 5, 64, torch.float32, seed=4)
    mask[:] = 1
    adv = adv[:, None].expand(2, 5).clone()  # per token, so that one token's value can be bad
    args = {"advantages": adv, "old_logprobs": old_lp, "ref_logprobs": ref_lp, "mask": mask}
    args[name] = args[name].clone()
    args[name].reshape(-1)[3] = bad
    kwargs = dict(beta=0.1, backend="torch")
    with pytest.raises(
        ValueError, match=rf"{name}: expected finite values" + ("" if name == "mask" else ".* position 3")
    ):
        ops.grpo_loss(logits, targets, args["advantages"], args["mask"], args["old_logprobs"], args["ref_logprobs"],
                      **kwargs)  # fmt: skip
    if name != "mask":  # at a masked-out token the value is never read: no error
        args["mask"] = mask.clone()
        args["mask"].reshape(-1)[3] = 0
        loss, _ = ops.grpo_loss(logits, targets, args["advantages"], args["mask"], args["old_logprobs"],
                                args["ref_logprobs"], **kwargs)  # fmt: skip
        assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(eps_low=float("nan")), "eps_low: expected a finite value >= 0"),
        (dict(eps_high=float("inf")), "eps_high: expected a finite value >= 0"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(dual_clip=float("nan")), "dual_clip"),
    ],
)
def test_nonfinite_hyperparameters_are_named(kwargs, match):
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 5, 64, torch.float32, seed=5)
    with pytest.raises(ValueError, match=match):
        ops.grpo_loss(logits, targets, adv, mask, old_lp, ref_lp, **kwargs)


def test_nonfinite_logits_raise_unless_disabled():
    logits, targets, adv, mask, old_lp, ref_lp = _inputs(2, 5, 64, torch.float32, seed=2)
    mask[:] = 1
    for backend in BACKENDS:
        for bad in (float("nan"), float("inf")):
            x = logits.clone()
            x[1, 3, 17] = bad
            with pytest.raises(ValueError, match=r"logits: expected finite values, got NaN/\+inf .* flat row 8"):
                ops.grpo_loss(x, targets, adv, mask, backend=backend)
            with pytest.raises(ValueError, match="logits: expected finite values"):
                ops.token_logprobs(x, targets, backend=backend)
            loss, _ = ops.grpo_loss(x, targets, adv, mask, old_lp, backend=backend, check_finite=False)
            if bad != bad:  # NaN propagates when the check is off (+inf gives logp = -inf in torch)
                assert not torch.isfinite(loss)
        # NaN in a masked row is skipped by the fused kernels and not reported
        x = logits.clone()
        x[1, 3, 17] = float("nan")
        mask2 = mask.clone()
        mask2[1, 3] = 0
        loss, _ = ops.grpo_loss(x, targets, adv, mask2, backend="cpp")
        assert torch.isfinite(loss)


def _bad_cases():
    lg = torch.randn(2, 3, 10)
    tg = torch.randint(0, 10, (2, 3))
    adv = torch.randn(2)
    m = torch.ones(2, 3)
    return [
        ((lg[0, 0], tg, adv, m), {}, ValueError, r"logits: expected shape \[B, T, V\] or \[N, V\], got shape \(10,\)"),
        ((lg.long(), tg, adv, m), {}, TypeError, "logits: expected a floating-point tensor"),
        ((lg.half(), tg, adv, m), {"backend": "cpp"}, TypeError, "logits: backend 'cpp' expects float32 or bfloat16"),
        (
            (lg, tg[:, :2], adv, m),
            {},
            ValueError,
            r"targets: expected shape \[2, 3\] \(logits.shape\[:-1\]\), got \[2, 2\]",
        ),
        ((lg, tg.float(), adv, m), {}, TypeError, "targets: expected an integer tensor"),
        ((lg, tg, adv, m[:1]), {}, ValueError, r"mask: expected shape \[2, 3\]"),
        ((lg, tg, torch.randn(3), m), {}, ValueError, r"advantages: expected shape \[2\] \(per sequence\) or \[2, 3\]"),
        ((lg, tg, adv, m, torch.randn(2, 4)), {}, ValueError, r"old_logprobs: expected shape \[2, 3\]"),
        ((lg, tg, adv, m, None, torch.randn(3)), {}, ValueError, r"ref_logprobs: expected shape \[2, 3\]"),
        (
            (lg, tg + 10, adv, m),
            {},
            ValueError,
            r"targets: expected values in \[0, V\) = \[0, 10\), got 1\d at flat position 0",
        ),
        ((lg, tg - 11, adv, m), {"backend": "torch"}, ValueError, r"targets: expected values in \[0, V\)"),
        ((lg, tg, adv, m), {"agg": "mean"}, ValueError, "agg: expected one of"),
        ((lg, tg, adv, m), {"backend": "tpu"}, ValueError, "backend: expected one of"),
        ((lg, tg, adv, m), {"kl_estimator": "k5"}, ValueError, "kl_estimator: expected one of"),
        ((lg, tg, adv, m), {"temperature": 0.0}, ValueError, "temperature: expected a finite value > 0"),
        ((lg, tg, adv, m), {"dual_clip": 0.5}, ValueError, "dual_clip: expected None, 0"),
        (
            (lg, tg, adv, m),
            {"segment_ids": torch.zeros(6, dtype=torch.long)},
            ValueError,
            "segment_ids: only valid with packed",
        ),
        ((lg[0], tg[0], torch.randn(2), m[0]), {}, ValueError, r"advantages: expected shape \[3\] \(per token\)"),
        (
            (lg[0], tg[0], torch.randn(1), m[0]),
            {"segment_ids": torch.tensor([0, 1, 1])},
            ValueError,
            r"advantages: expected one value per sequence",
        ),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), _bad_cases())
def test_bad_input_raises_naming_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.grpo_loss(*args, **kwargs)


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError, match=r"targets: expected shape \[4\]"):
        ops.token_logprobs(torch.randn(4, 9), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, V\) = \[0, 9\), got -1"):
        ops.token_logprobs(torch.randn(4, 9), torch.tensor([0, 1, -1, 2]))
    with pytest.raises(RuntimeError, match=r"targets: expected values in \[0, V\)"):  # the C++ op checks too
        torch.ops.r1engine.logprobs_fwd(torch.randn(2, 9), torch.tensor([0, 9]), None, 1.0, False)
    with pytest.raises(RuntimeError, match="logits: expected dtype float32 or bfloat16"):
        torch.ops.r1engine.logprobs_fwd(torch.randn(2, 9).double(), torch.tensor([0, 1]), None, 1.0, False)


def test_backend_resolution():
    assert resolve("auto", torch.device("cpu")) == "cpp"
    assert load("cpp") is compiled and load("torch") is torch_ref
    with pytest.raises(ValueError, match="backend: expected one of"):
        resolve("jax", torch.device("cpu"))
    try:
        import triton  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
            load("triton")
    else:
        mod = load("triton")
        assert all(hasattr(mod, f) for f in ("logprobs_fwd", "logprobs_bwd"))


def test_eager_calls_do_not_load_the_compiler():
    """Eager forward and backward of every fused op leave `torch._dynamo` unimported: `torch.library.custom_op`
    would import it (about 144 MiB resident) on the first call; r1engine registers its ops without that wrapper."""
    script = """
import sys, torch
import r1engine.ops as ops
from r1engine.ops.linear_grpo_loss import linear_grpo_loss
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 5, 11, generator=g, requires_grad=True)
t = torch.randint(0, 11, (2, 5), generator=g)
adv, mask = torch.randn(2, generator=g), torch.ones(2, 5)
loss, _ = ops.grpo_loss(x, t, adv, mask, torch.randn(2, 5, generator=g) - 2, beta=0.1, backend="cpp")
(loss + ops.token_logprobs(x, t, backend="cpp").sum()).backward()
h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
linear_grpo_loss(h, w, t, adv, mask, backend="torch")[0].backward()
assert x.grad is not None and h.grad is not None and w.grad is not None
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_linear_grpo_loss_names_nonfinite_inputs_too():
    from r1engine.ops.linear_grpo_loss import linear_grpo_loss

    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(7, 8, generator=g), torch.randn(13, 8, generator=g)
    targets, mask = torch.randint(0, 13, (7,), generator=g), torch.ones(7)
    for name in ("advantages", "old_logprobs", "ref_logprobs"):
        args = {"advantages": torch.randn(7, generator=g), "old_logprobs": -torch.rand(7, generator=g),
                "ref_logprobs": -torch.rand(7, generator=g)}  # fmt: skip
        args[name][4] = float("nan")
        with pytest.raises(ValueError, match=rf"{name}: expected finite values.* position 4"):
            linear_grpo_loss(hidden, weight, targets, mask=mask, beta=0.1, **args)
    with pytest.raises(ValueError, match="beta"):
        linear_grpo_loss(hidden, weight, targets, torch.randn(7), mask, beta=float("inf"))


def _issue_example():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 5, generator=g), torch.randint(0, 5, (4,), generator=g)
    seg, adv = torch.tensor([0, 1, 1, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0])  # sequence 2 has no token here
    return logits, targets, seg, adv


@pytest.mark.parametrize("impl", ["op", "reference", "linear"])
def test_advantages_of_length_n_and_s_at_once_must_say_which(impl):
    """[S] advantages with S = N used to be read per token by the shape alone."""
    from r1engine.ops.linear_grpo_loss import linear_grpo_loss

    logits, targets, seg, adv = _issue_example()
    mask = torch.ones(4)
    if impl == "linear":
        hidden, weight = logits, torch.eye(5)  # logits = hidden @ I
        call = lambda **kw: linear_grpo_loss(hidden, weight, targets, adv, mask, segment_ids=seg, **kw)  # noqa: E731
    else:
        fn = ops.grpo_loss if impl == "op" else grpo_loss_reference
        call = lambda **kw: fn(logits, targets, adv, mask, segment_ids=seg, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="advantages_per"):
        call(agg="token-mean")
    per_seq, _ = call(agg="token-mean", advantages_per="sequence")
    per_tok, _ = call(agg="token-mean", advantages_per="token")
    assert per_seq.item() == pytest.approx(-(1 + 2 + 2 + 4) / 4)  # on-policy: the loss is -mean(A) per token
    assert per_tok.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    with pytest.raises(ValueError, match="advantages_per"):
        call(agg="token-mean", advantages_per="seq")
    # one token per sequence: both readings are the same, no keyword needed
    ones = torch.arange(4)
    alone = (linear_grpo_loss(logits, torch.eye(5), targets, adv, mask, segment_ids=ones) if impl == "linear"
             else (ops.grpo_loss if impl == "op" else grpo_loss_reference)(logits, targets, adv, mask,
                                                                            segment_ids=ones))  # fmt: skip
    assert alone[0].item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)


def test_packed_drgrpo_counts_every_sequence_id():
    """Dr.GRPO divides by the number of sequences, masked or absent: segment ids [0, 1, 1, 3] are 4 sequences."""
    logits, targets, seg, adv = _issue_example()
    loss, _ = ops.grpo_loss(logits, targets, adv, torch.ones(4), segment_ids=seg, advantages_per="sequence",
                            agg="seq-mean-token-sum-norm", max_len=2)  # fmt: skip
    assert loss.item() == pytest.approx(-(1 + 2 + 2 + 4) / (4 * 2))
