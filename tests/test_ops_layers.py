"""Fused decoder-layer operators (r1engine.ops.rms_norm / swiglu / rope) against their op-by-op PyTorch references.

Grid: odd hidden sizes (1, 7, 33, 191, ...), 1-row inputs, several leading shapes, non-contiguous inputs, fp32 and
bf16, both backends ("cpp": the C++ kernels, "torch": the same formulas in PyTorch inside the operator); forward and
gradients. fp32 is compared tightly with the reference on the same inputs. bf16 is compared with the reference run
in fp32 on the same (bf16) values: the fused ops compute in fp32 and round once, so they must sit within a bf16
rounding of it. Also: torch.compile(fullgraph=True), bad-input errors, eager calls not importing the compiler, the
saved-activation bytes (fused < op-by-op), and PolicyModel with the fused ops equal to PolicyModel with the references.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from r1engine import ops, settings
from r1engine.models.config import PolicyConfig
from r1engine.models.policy import PolicyModel
from r1engine.ops.backends import registry
from r1engine.ops.rms_norm import rms_norm_reference
from r1engine.ops.rope import rope_reference
from r1engine.ops.swiglu import swiglu_reference

BACKENDS = ["cpp", "torch"]
DTYPES = [torch.float32, torch.bfloat16]


def _tols(dtype):
    # fp32: same inputs, fp32 math (summation order / rsqrt rounding differ). bf16: one rounding to bf16 (2^-9
    # relative) on top of fp32 math, against the fp32 oracle.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-4)


def _randn(shape, dtype, seed, scale=1.0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # same values laid out with the last two dims swapped, then transposed back: a strided view
        full = (torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g) * scale).to(dtype)
        return full.transpose(-1, -2)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _leaf(t):
    return t.detach().requires_grad_()


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _assert_close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **_tols(dtype))


# ----------------------------------------------------------------------------------------------------------- RMSNorm
RMS_SHAPES = [(1, 1), (1, 7), (5, 33), (2, 3, 191), (2, 100, 191), (4, 896)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_rms_norm_matches_reference(shape, dtype, backend):
    h = shape[-1]
    x = _randn(shape, dtype, seed=h, scale=3.0, noncontig=len(shape) == 3 and h > 1)
    w = _randn((h,), dtype, seed=h + 1) + 1.0
    dy = _randn(shape, dtype, seed=h + 2)
    xa, wa = _leaf(x), _leaf(w)
    y = ops.rms_norm(xa, wa, 1e-6, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    dx, dw = _grads(y, (xa, wa), dy)
    assert dx.dtype == dtype and dw.dtype == dtype
    # oracle: the reference in fp32 on the same values
    xr, wr = _leaf(x.float()), _leaf(w.float())
    yr = rms_norm_reference(xr, wr, 1e-6)
    dxr, dwr = _grads(yr, (xr, wr), dy.float())
    _assert_close(y, yr, dtype)
    _assert_close(dx, dxr, dtype)
    _assert_close(dw, dwr, dtype)


def test_rms_norm_mixed_dtypes_and_eps():
    """bf16 activations with an fp32 weight (output in x's dtype, dweight in weight's), and a large eps."""
    x, w = _randn((3, 7, 33), torch.bfloat16, seed=1), _randn((33,), torch.float32, seed=2)
    dy = _randn((3, 7, 33), torch.bfloat16, seed=3)
    for eps in (1e-6, 0.5):
        xa, wa = _leaf(x), _leaf(w)
        y = ops.rms_norm(xa, wa, eps)
        assert y.dtype == torch.bfloat16
        dx, dw = _grads(y, (xa, wa), dy)
        assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
        xr, wr = _leaf(x.float()), _leaf(w)
        yr = rms_norm_reference(xr, wr, eps)
        dxr, dwr = _grads(yr, (xr, wr), dy.float())
        _assert_close(y, yr, torch.bfloat16)
        _assert_close(dx, dxr, torch.bfloat16)
        torch.testing.assert_close(dw, dwr, rtol=1e-5, atol=1e-5)  # fp32 weight: fp32 gradient


# ------------------------------------------------------------------------------------------------------------ SwiGLU
SWIGLU_SHAPES = [(1, 1), (3, 7), (2, 5, 33), (4, 191), (1, 40, 1031)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_matches_reference(shape, dtype, backend):
    n = shape[-1]
    gate = _randn(shape, dtype, seed=n, scale=3.0, noncontig=len(shape) == 3)
    up = _randn(shape, dtype, seed=n + 1)
    dy = _randn(shape, dtype, seed=n + 2)
    ga, ua = _leaf(gate), _leaf(up)
    y = ops.swiglu(ga, ua, backend=backend)
    assert y.dtype == dtype and y.shape == gate.shape
    dg, du = _grads(y, (ga, ua), dy)
    gr, ur = _leaf(gate.float()), _leaf(up.float())
    yr = swiglu_reference(gr, ur)
    dgr, dur = _grads(yr, (gr, ur), dy.float())
    _assert_close(y, yr, dtype)
    _assert_close(dg, dgr, dtype)
    _assert_close(du, dur, dtype)


def test_swiglu_saturated_gates():
    gate = torch.tensor([[-100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, -88.5, 89.0]])
    up = torch.full_like(gate, 2.0)
    ga, ua = _leaf(gate), _leaf(up)
    y = ops.swiglu(ga, ua)
    dg, du = _grads(y.sum(), (ga, ua), None)
    gr, ur = _leaf(gate), _leaf(up)
    yr = swiglu_reference(gr, ur)
    dgr, dur = _grads(yr.sum(), (gr, ur), None)
    for got, want in ((y, yr), (dg, dgr), (du, dur)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------------------- RoPE
# (x shape [..., T, H, D], cos/sin shape [..., T, D])
ROPE_SHAPES = [
    ((1, 1, 1, 2), (1, 1, 2)),
    ((1, 5, 3, 6), (1, 5, 6)),
    ((3, 7, 2, 34), (1, 7, 34)),  # cos shared by the batch (broadcast)
    ((3, 7, 2, 34), (3, 7, 34)),
    ((11, 4, 32), (11, 32)),  # no batch dim
    ((1, 300, 4, 32), (1, 300, 32)),  # enough rows for the multi-threaded path
]


def _cos_sin(shape, seed):
    g = torch.Generator().manual_seed(seed)
    ang = torch.randn(*shape, generator=g) * 3
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,cs_shape", ROPE_SHAPES)
def test_rope_matches_reference(x_shape, cs_shape, dtype, backend):
    d = x_shape[-1]
    x = _randn(x_shape, dtype, seed=d, noncontig=x_shape[-2] > 1)
    cos, sin = _cos_sin(cs_shape, seed=d + 1)
    dy = _randn(x_shape, dtype, seed=d + 2)
    xa = _leaf(x)
    y = ops.rope(xa, cos, sin, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    (dx,) = _grads(y, (xa,), dy)
    xr = _leaf(x.float())
    yr = rope_reference(xr, cos, sin)
    (dxr,) = _grads(yr, (xr,), dy.float())
    _assert_close(y, yr, dtype)
    _assert_close(dx, dxr, dtype)
    if dtype == torch.float32 and backend == "cpp":  # same rounding as the op-by-op graph: bit for bit
        assert torch.equal(y, yr)


def test_rope_bf16_equals_bf16_reference():
    """In bf16 too, the fused forward equals the op-by-op reference run in bf16 (fp32 math, one final rounding)."""
    x = _randn((2, 9, 3, 64), torch.bfloat16, seed=3)
    cos, sin = _cos_sin((2, 9, 64), seed=4)
    assert torch.equal(ops.rope(x, cos, sin), rope_reference(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_calls_without_autograd_match(dtype):
    """Without grad (no_grad, or inputs that need none) the entry points call the kernels directly: same results."""
    x, w = _randn((3, 5, 33), dtype, seed=1), _randn((33,), dtype, seed=2)
    g, u = _randn((4, 19), dtype, seed=3), _randn((4, 19), dtype, seed=4)
    q = _randn((2, 6, 3, 8), dtype, seed=5)
    cos, sin = _cos_sin((1, 6, 8), seed=6)
    cases = [  # (op, differentiable inputs, other inputs, reference)
        (ops.rms_norm, (x, w), (1e-6,), rms_norm_reference),
        (ops.swiglu, (g, u), (), swiglu_reference),
        (ops.rope, (q,), (cos, sin), rope_reference),
    ]
    for fused, inputs, rest, reference in cases:
        with_graph = fused(*[_leaf(t) for t in inputs], *rest)
        assert with_graph.requires_grad
        plain = fused(*inputs, *rest)  # nothing requires grad
        with torch.no_grad():
            no_grad = fused(*[_leaf(t) for t in inputs], *rest)
        assert not plain.requires_grad and not no_grad.requires_grad
        assert torch.equal(plain, with_graph.detach()) and torch.equal(no_grad, plain)
        _assert_close(plain, reference(*[t.float() for t in inputs], *rest), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tensors_take_the_torch_backend(dtype):
    """CUDA tensors: "auto" resolves to the PyTorch formulas (no CUDA kernels yet); results match the references."""
    dev = torch.device("cuda")
    x, w = _randn((3, 5, 33), dtype, seed=1).to(dev), _randn((33,), dtype, seed=2).to(dev)
    g, u = _randn((4, 19), dtype, seed=3).to(dev), _randn((4, 19), dtype, seed=4).to(dev)
    q = _randn((2, 6, 3, 8), dtype, seed=5).to(dev)
    cos, sin = (t.to(dev) for t in _cos_sin((1, 6, 8), seed=6))
    assert registry.get("rms_norm").resolve("auto", x.device, x.dtype) == "torch"
    cases = [
        (ops.rms_norm, (x, w), (1e-6,), rms_norm_reference),
        (ops.swiglu, (g, u), (), swiglu_reference),
        (ops.rope, (q,), (cos, sin), rope_reference),
    ]
    for fused, inputs, rest, reference in cases:
        leaves = [_leaf(t) for t in inputs]
        y = fused(*leaves, *rest)
        dy = torch.randn_like(y)
        grads = _grads(y, leaves, dy)
        ref_leaves = [_leaf(t.float()) for t in inputs]
        yr = reference(*ref_leaves, *rest)
        grads_r = _grads(yr, ref_leaves, dy.float())
        _assert_close(y, yr, dtype)
        for a, b in zip(grads, grads_r, strict=True):
            _assert_close(a, b, dtype)


# -------------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_all_three():
    torch._dynamo.reset()
    h, inter, heads, d = 33, 47, 3, 8

    def block(x, w, wg, wu, cos, sin):
        n = ops.rms_norm(x, w, 1e-6)
        q = ops.rope(n[..., : heads * d].reshape(*x.shape[:-1], heads, d), cos, sin)
        m = ops.swiglu(n @ wg, n @ wu)
        return q.float().square().sum() + m.float().sum()

    args = [
        _randn((2, 5, h), torch.float32, seed=1),
        _randn((h,), torch.float32, seed=2) + 1,
        _randn((h, inter), torch.float32, seed=3),
        _randn((h, inter), torch.float32, seed=4),
    ]
    cos, sin = _cos_sin((2, 5, d), seed=5)
    a = [_leaf(t) for t in args]
    out = torch.compile(block, fullgraph=True)(*a, cos, sin)
    grads = torch.autograd.grad(out, a)
    b = [_leaf(t) for t in args]
    out_e = block(*b, cos, sin)
    grads_e = torch.autograd.grad(out_e, b)
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, ge)


# ------------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 33)
    with pytest.raises(ValueError, match=r"weight: expected shape \[x.shape\[-1\]\] = \[33\], got \[32\]"):
        ops.rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match=r"weight: expected shape .* got \[1, 33\]"):
        ops.rms_norm(x, torch.ones(1, 33), 1e-6)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        ops.rms_norm(torch.ones(2, 3, dtype=torch.long), torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match=r"x: expected shape \[..., H\] with H >= 1, got shape \[4, 0\]"):
        ops.rms_norm(torch.ones(4, 0), torch.ones(0), 1e-6)
    with pytest.raises(ValueError, match="eps: expected a float >= 0, got -1"):
        ops.rms_norm(x, torch.ones(33), -1.0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.rms_norm(x, torch.ones(33), 1e-6, backend="triton")
    with pytest.raises(TypeError, match="x: backend 'cpp' expects float32 or bfloat16, got torch.float16"):
        ops.rms_norm(x.half(), torch.ones(33), 1e-6, backend="cpp")

    with pytest.raises(ValueError, match=r"up: expected shape \[2, 7\] \(as gate\), got \[2, 8\]"):
        ops.swiglu(torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"up: expected dtype torch.float32 \(as gate\), got torch.bfloat16"):
        ops.swiglu(torch.randn(2, 7), torch.randn(2, 7, dtype=torch.bfloat16))

    q = torch.randn(1, 4, 2, 8)
    cos, sin = _cos_sin((1, 4, 8), seed=0)
    with pytest.raises(ValueError, match=r"x: expected an even head dim D .* got D = 7 in shape \[1, 4, 2, 7\]"):
        ops.rope(torch.randn(1, 4, 2, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(
        ValueError, match=r"cos: expected shape \[..., T, D\] broadcastable to .* \[1, 4, 8\], got \[1, 5, 8\]"
    ):
        ops.rope(q, *_cos_sin((1, 5, 8), seed=0))
    with pytest.raises(ValueError, match=r"cos: .* got \[1, 4, 6\]"):
        ops.rope(q, cos[..., :6], sin)
    with pytest.raises(ValueError, match=r"sin: expected shape \[1, 4, 8\] \(as cos\), got \[4, 8\]"):
        ops.rope(q, cos, sin[0])
    with pytest.raises(ValueError, match=r"x: expected shape \[..., T, H, D\], got shape \[4, 8\]"):
        ops.rope(torch.randn(4, 8), cos[0], sin[0])
    with pytest.raises(ValueError, match="cos: rope gives no gradient to cos/sin"):
        ops.rope(q, cos.clone().requires_grad_(), sin)
    with torch.no_grad():  # without grad mode a cos that requires grad is fine
        ops.rope(q, cos.clone().requires_grad_(), sin)

    # The raw kernels check their inputs too (they take contiguous, pre-flattened tensors).
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        torch.ops.r1engine.rms_norm_fwd(torch.randn(8, 6).t(), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"cos: expected shape \[rows, D\] = \[4, 8\] .*got \[1, 3, 8\]"):
        torch.ops.r1engine.rope_fwd(q, cos[:, :3], sin)


def test_backend_auto_resolution():
    x = torch.randn(2, 3)
    for op in ("rms_norm", "swiglu", "rope"):
        backends = registry.get(op)
        assert backends.resolve("auto", x.device, x.dtype) == "cpp"
        assert backends.resolve("auto", x.device, torch.bfloat16) == "cpp"
        assert backends.resolve("auto", x.device, torch.float16) == "torch"  # no fp16 kernel: the PyTorch formulas
        assert backends.resolve("auto", x.device, torch.float64) == "torch"
        assert backends.resolve("auto", torch.device("cuda"), x.dtype) == "torch"  # no CUDA kernels yet
    y = ops.rms_norm(x.double(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(y, rms_norm_reference(x.double(), torch.ones(3, dtype=torch.float64)))


# -------------------------------------------------------------------------------------------- memory and imports
def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves for the backward of `fn(*args)` (one count per storage)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_save_less_than_reference(dtype):
    n, h, inter, heads, d = 64, 192, 512, 6, 32
    x, w = _leaf(_randn((n, h), dtype, seed=1)), _leaf(_randn((h,), dtype, seed=2))
    fused, ref = saved_bytes(ops.rms_norm, x, w, 1e-6), saved_bytes(rms_norm_reference, x, w, 1e-6)
    assert fused == x.nbytes + n * 4 + w.nbytes  # x, rstd (fp32 per row), weight
    assert fused < ref

    g, u = _leaf(_randn((n, inter), dtype, seed=3)), _leaf(_randn((n, inter), dtype, seed=4))
    fused, ref = saved_bytes(ops.swiglu, g, u), saved_bytes(swiglu_reference, g, u)
    assert fused == g.nbytes + u.nbytes  # gate and up only (silu(gate) is recomputed)
    assert fused < ref

    # RoPE: the fused op keeps only cos and sin. The op-by-op graph happens to keep only them too (it multiplies
    # by tensors that need no grad), so the bytes are equal; the fused op's gain is passes, not memory.
    q = _leaf(_randn((1, n, heads, d), dtype, seed=5))
    cos, sin = _cos_sin((1, n, d), seed=6)
    fused, ref = saved_bytes(ops.rope, q, cos, sin), saved_bytes(rope_reference, q, cos, sin)
    assert fused == cos.nbytes + sin.nbytes
    assert fused <= ref


def test_eager_calls_do_not_load_the_compiler():
    """Eager forward and backward of the three ops leave `torch._dynamo` (and sympy) unimported."""
    script = """
import sys, torch
import r1engine.ops as ops
for backend in ("cpp", "torch"):
    x, w = torch.randn(3, 5, 33, requires_grad=True), torch.randn(33, requires_grad=True)
    g, u = torch.randn(4, 19, requires_grad=True), torch.randn(4, 19, requires_grad=True)
    q = torch.randn(2, 9, 3, 6, requires_grad=True)
    cos, sin = torch.randn(1, 9, 6), torch.randn(1, 9, 6)
    loss = ops.rms_norm(x, w, 1e-6, backend=backend).sum() + ops.swiglu(g, u, backend=backend).sum()
    (loss + ops.rope(q, cos, sin, backend=backend).sum()).backward()
    assert x.grad is not None and w.grad is not None and g.grad is not None and q.grad is not None
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------- PolicyModel
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_fused_equals_reference_ops(dtype):
    """PolicyModel with the fused ops (default) vs with the op-by-op references: packed forward and gradients."""
    cfg = PolicyConfig.demo(vocab_size=101, num_mtp_layers=1)
    model = PolicyModel(cfg).to(dtype)
    model.reset_parameters(seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (1, 40), generator=g)
    cu = torch.tensor([0, 13, 31, 40])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, cu_seqlens=cu)
        loss = out.logits.float().logsumexp(-1).mean() + model.mtp_loss(ids, out.last_hidden, cu_seqlens=cu)
        loss.backward()
        return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    logits_f, grads_f = run()
    with settings.override(fused_layer_ops=False):
        logits_r, grads_r = run()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(logits_f, logits_r, **tol)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grad, grads_r[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
