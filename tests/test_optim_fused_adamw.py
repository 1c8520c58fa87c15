"""r1engine.optim.FusedAdamW against torch.optim.AdamW (the reference), for both backends (cpp, torch)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from r1engine import _ext
from r1engine.optim import FusedAdamW, clip_coefficient

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _ext.has_op("adamw_step_"), reason="extension not built")),
    "torch",
]
SHAPES = [(1,), (7,), (8,), (13, 17), (3, 5, 9), (1031,), (4099, 3)]


def _params(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _set_grads(groups: list[list[torch.Tensor]], step: int, seed: int) -> None:
    """Same random gradients on every copy; params 1 and 4 have no gradient on odd steps."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p0 in enumerate(groups[0]):
        grad = None if (i in (1, 4) and step % 2 == 1) else torch.randn(p0.shape, generator=g) * (0.1 * (i + 1))
        for params in groups:
            params[i].grad = None if grad is None else grad.to(params[i].dtype, copy=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_fp32(backend, weight_decay):
    ours, ref = _params(0), None
    ref = _clone(ours)
    opt = FusedAdamW(ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay)
    for step in range(6):
        if step == 3:  # a scheduler-like lr change, through both access paths
            opt.lr = 5e-3
            ref_opt.param_groups[0]["lr"] = 5e-3
        if step == 4:
            opt.param_groups[0]["lr"] = 2e-3
            ref_opt.param_groups[0]["lr"] = 2e-3
        _set_grads([ours, ref], step, seed=1)
        opt.step()
        ref_opt.step()
    for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"param {i}")
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert opt.state[p]["step"] == int(ref_opt.state[q]["step"]) == (3 if i in (1, 4) else 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_with_own_hyperparameters(backend):
    ours = _params(2)
    ref = _clone(ours)

    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.0, "lr": 3e-2}, {"params": ps[3:], "betas": (0.8, 0.99)}]

    opt = FusedAdamW(groups(ours), lr=1e-2, weight_decay=0.05, backend=backend)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.05)
    for step in range(4):
        _set_grads([ours, ref], step, seed=3)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_fp32_state(backend):
    """bf16 params: each step is fp32 AdamW (fp32 state) on the bf16 value, rounded to bf16 at the end."""
    ours = _params(4, torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in ours]
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    total = exact = 0
    for step in range(5):
        _set_grads([ours, ref], step, seed=5)
        for q in ref:  # the reference sees the same bf16 gradient values
            if q.grad is not None:
                q.grad = q.grad.bfloat16().float()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref, strict=True):
            assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
            expect = q.detach().bfloat16()
            # 1 bf16 ulp where an fp32 rounding difference crosses a bf16 rounding boundary
            torch.testing.assert_close(p.float(), expect.float(), rtol=2**-7, atol=1e-6)
            total += p.numel()
            exact += int((p == expect).sum())
            with torch.no_grad():
                q.copy_(p.float())  # both continue from the stored bf16 parameter
    assert exact / total > 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_resumes_identically(backend):
    ours = _params(6)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    for step in range(3):
        _set_grads([ours], step, seed=7)
        opt.step()
    opt.lr = 4e-3
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ours], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = FusedAdamW(resumed, lr=1.0, weight_decay=0.0, backend=backend)  # hyperparameters come from the dict
    opt2.load_state_dict(saved["optim"])
    assert opt2.lr == 4e-3 and opt2.param_groups[0]["weight_decay"] == 0.1
    for step in range(3, 6):
        _set_grads([ours, resumed], step, seed=7)
        opt.step()
        opt2.step()
    for p, q in zip(ours, resumed, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
        assert opt.state[p]["step"] == opt2.state[q]["step"]
    # The loaded moments are copies: stepping one optimizer does not move the other's state.
    assert all(
        opt.state[p]["exp_avg"].data_ptr() != opt2.state[q]["exp_avg"].data_ptr()
        for p, q in zip(ours, resumed, strict=True)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_interchange_with_torch_adamw(backend):
    ours = _params(8)
    ref = _clone(ours)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _set_grads([ref], step, seed=9)
        torch_opt.step()
    with torch.no_grad():
        for p, q in zip(ours, ref, strict=True):
            p.copy_(q)
    opt = FusedAdamW(ours, backend=backend)
    opt.load_state_dict(torch_opt.state_dict())  # torch -> ours
    back = _clone(ours)
    torch_back = torch.optim.AdamW(back, lr=0.5)
    torch_back.load_state_dict(copy.deepcopy(opt.state_dict()))  # ours -> torch (torch keeps the tensors it loads)
    for step in range(3, 6):
        _set_grads([ours, ref, back], step, seed=9)
        opt.step()
        torch_opt.step()
        torch_back.step()
    for p, q, r in zip(ours, ref, back, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_and_fused_grad_scale(backend, max_norm):
    ours = _params(10)
    ref = _clone(ours)
    fused = _clone(ours)
    opt = FusedAdamW(ours, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    fused_opt = FusedAdamW(fused, lr=1e-2, backend=backend)
    for step in range(3):
        _set_grads([ours, ref, fused], step, seed=11)
        norm = opt.clip_grad_norm_(max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert norm == pytest.approx(float(ref_norm), rel=1e-6)
        for p, q in zip(ours, ref, strict=True):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
        fused_norm = fused_opt.grad_norm()
        assert fused_norm == norm
        fused_opt.step(grad_scale=clip_coefficient(fused_norm, max_norm))  # clip inside the step
        opt.step()
        ref_opt.step()
    for p, q, r in zip(ours, ref, fused, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r, q, rtol=1e-6, atol=1e-6)


def test_grad_norm_bf16_and_nonfinite():
    ps = _params(12, torch.bfloat16)
    for p in ps:
        p.grad = torch.randn_like(p)
    expect = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in ps]))
    assert FusedAdamW(ps).grad_norm() == pytest.approx(float(expect), rel=1e-6)
    ps[3].grad[0, 0] = float("inf")
    assert not torch.isfinite(torch.tensor(FusedAdamW(ps).grad_norm()))
    assert FusedAdamW(_params(13)).grad_norm() == 0.0  # no gradients at all


def test_zero_grad():
    ps = _params(14)
    opt = FusedAdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    opt.step()  # no gradients: nothing happens, no state
    assert opt.state == {}


def test_bad_arguments():
    ps = _params(15)
    with pytest.raises(ValueError, match="lr"):
        FusedAdamW(ps, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(ps, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty"):
        FusedAdamW([])
    with pytest.raises(ValueError, match="more than one"):
        FusedAdamW([ps[0], ps[0]])
    with pytest.raises(ValueError, match="non-leaf"):
        FusedAdamW([ps[0] * 2])
    with pytest.raises(ValueError, match="backend"):
        FusedAdamW(ps, backend="cuda")
    opt = FusedAdamW(ps)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


@pytest.mark.skipif(not _ext.has_op("adamw_step_"), reason="extension not built")
def test_op_checks_its_arguments():
    p, m, v = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    op = torch.ops.r1engine.adamw_step_
    with pytest.raises(RuntimeError, match=r"grads\[0\]"):
        op([p], [torch.zeros(5, dtype=torch.bfloat16)], [m], [v], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\]"):
        op([p], [p.clone()], [torch.zeros(4)], [v], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"steps\[0\]"):
        op([p], [p.clone()], [m], [v], [0], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(
            [torch.zeros(4, 2).t()],
            [torch.zeros(2, 4)],
            [torch.zeros(8)],
            [torch.zeros(8)],
            [1],
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0,
            1.0,
        )


def test_does_not_import_dynamo():
    """The reason this optimizer exists: a training step with it keeps torch._dynamo (and sympy) out of the process."""
    code = textwrap.dedent(
        """
        import sys, traceback
        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name == "torch._dynamo":
                    traceback.print_stack()
                    raise SystemExit("torch._dynamo imported")
                return None
        sys.meta_path.insert(0, Finder())
        import torch
        import r1engine
        from r1engine.optim import FusedAdamW
        model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.GELU(), torch.nn.Linear(13, 3))
        opt = FusedAdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(torch.randn(4, 9)).square().mean().backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        opt.load_state_dict(opt.state_dict())
        assert "torch._dynamo" not in sys.modules and "sympy" not in sys.modules
        print("ok", opt._use_cpp)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
