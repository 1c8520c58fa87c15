"""The one backend registry (r1engine.ops.backends.registry): every op with a backend switch is registered, "auto" picks
the compiled kernels on this machine's CPU, bad names raise one error format naming the op, and a fast path passed
over is logged once with its reason (a warning when it is broken, and a failed test: tests/conftest.py)."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import r1engine.optim  # noqa: F401  (registers fused_adamw)
import r1engine.packing  # noqa: F401  (registers varlen_attention, packing_plan)
from r1engine import _ext, ops
from r1engine.ops.backends import registry
from r1engine.optim import FusedAdamW
from r1engine.packing import plan, varlen_attention

OPS = ("grpo_loss", "linear_grpo_loss", "rms_norm", "swiglu", "rope", "varlen_attention", "packing_plan", "fused_adamw")
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def simulated():
    """For tests that simulate broken or missing fast paths: the registry forgets them afterwards (before the
    conftest's check for broken fast paths runs), and the import checks are tried afresh."""
    registry.reset()
    yield
    registry.reset()


def test_every_op_with_a_backend_switch_is_registered():
    assert set(OPS) <= set(registry.registered())
    for op in OPS:
        names = registry.get(op).names
        assert names[0] == "auto" and len(set(names)) == len(names)
    with pytest.raises(KeyError, match="no backends registered for 'nope'"):
        registry.get("nope")


@pytest.mark.skipif(not _ext.built(), reason="compiled extension not built")
def test_auto_picks_the_compiled_kernels_on_this_cpu():
    """With the extension built, "auto" takes its kernels for CPU tensors. A build that fails to load or lacks an
    operator fails here (and in every test that runs into it, tests/conftest.py), never quietly slows down."""
    assert _ext.available(), _ext.load_error()
    for op in ("grpo_loss", "rms_norm", "swiglu", "rope", "packing_plan", "fused_adamw"):
        assert registry.get(op).resolve("auto", CPU, torch.float32) == "cpp", op
    assert registry.get("varlen_attention").resolve("auto", CPU, torch.bfloat16) == "cpu"
    assert registry.get("linear_grpo_loss").resolve("auto", CPU) == "torch"  # no CPU kernel: the chunked reference
    assert registry.broken() == []


def test_auto_on_cuda_tensors_follows_the_preference_order():
    """Resolution needs only the device: CUDA tensors prefer the CUDA kernel, then Triton, then the reference."""
    want = "cuda" if _ext.cuda_compiled() else "triton" if importlib.util.find_spec("triton") else "torch"
    assert registry.get("grpo_loss").resolve("auto", CUDA) == want
    assert registry.get("rms_norm").resolve("auto", CUDA, torch.float32) == "torch"  # no CUDA kernels yet
    want = "flash" if importlib.util.find_spec("flash_attn") else "sdpa_bucket"
    assert registry.get("varlen_attention").resolve("auto", CUDA, torch.bfloat16) == want


def test_a_bad_backend_names_the_op_the_value_and_the_choices():
    x = torch.randn(3, 8)
    q = torch.randn(5, 2, 4)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    calls = {
        "grpo_loss": lambda: ops.grpo_loss(x, x[:, 0].long(), torch.ones(3), torch.ones(3), backend="tpu"),
        "linear_grpo_loss": lambda: ops.linear_grpo_loss(
            x, torch.randn(7, 8), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(3), backend="tpu"
        ),
        "rms_norm": lambda: ops.rms_norm(x, torch.ones(8), backend="tpu"),
        "swiglu": lambda: ops.swiglu(x, x, backend="tpu"),
        "rope": lambda: ops.rope(q[None], torch.ones(1, 5, 4), torch.zeros(1, 5, 4), backend="tpu"),
        "varlen_attention": lambda: varlen_attention(q, q, q, cu, 5, backend="tpu"),
        "packing_plan": lambda: plan([3, 2], 8, backend="tpu"),
        "fused_adamw": lambda: FusedAdamW([torch.zeros(2, requires_grad=True)], backend="tpu"),
    }
    for op, call in calls.items():
        names = registry.get(op).names
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"backend: expected one of {names} for {op}, got 'tpu'"


@pytest.mark.skipif(not _ext.has_op("varlen_attention_fwd"), reason="compiled extension not built")
def test_cpp_names_the_cpu_kernel_of_varlen_attention_too():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert registry.get("varlen_attention").validate("cpp") == "cpu"
    assert torch.equal(varlen_attention(q, k, v, cu, 5, backend="cpp"), varlen_attention(q, k, v, cu, 5, backend="cpu"))


def _fake_import(monkeypatch, module: str, exc: BaseException) -> None:
    real = importlib.import_module

    def fake(name, package=None):
        if name == module:
            raise exc
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_a_broken_triton_kernel_is_a_warning_with_its_reason_once(monkeypatch, caplog, simulated):
    """An ImportError from inside the kernel module (here a symbol triton no longer has) is a broken install: logged
    once as a warning naming the op, the backend and the exception, and recorded for the test suite's check."""
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    exc = ImportError("cannot import name 'fast_expf' from 'triton.language.extra'")
    _fake_import(monkeypatch, "r1engine.kernels.grpo_loss", exc)
    with caplog.at_level(logging.INFO, logger="r1engine.ops.backends"):
        assert registry.get("grpo_loss").resolve("auto", CUDA) == "torch"
        assert registry.get("grpo_loss").resolve("auto", CUDA) == "torch"
    records = [r for r in caplog.records if "'triton'" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert message.startswith("grpo_loss: backend 'triton' unavailable, using 'torch': r1engine.kernels.grpo_loss")
    assert "ImportError: cannot import name 'fast_expf'" in message
    assert [(op, backend) for op, backend, _ in registry.broken()] == [("grpo_loss", "triton")]


def test_a_missing_package_is_info_and_not_broken(monkeypatch, caplog, simulated):
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    missing = ModuleNotFoundError("No module named 'triton'", name="triton")
    _fake_import(monkeypatch, "r1engine.kernels.grpo_loss", missing)
    with caplog.at_level(logging.INFO, logger="r1engine.ops.backends"):
        assert registry.get("grpo_loss").resolve("auto", CUDA) == "torch"
    (record,) = [r for r in caplog.records if "'triton'" in r.getMessage()]
    assert record.levelno == logging.INFO and "triton is not installed" in record.getMessage()
    assert registry.broken() == []


def test_an_error_other_than_importerror_propagates(monkeypatch, simulated):
    """No `except Exception` around kernel imports: a kernel module that raises anything but ImportError (a bug in
    it, a triton that fails at decoration) stops the call instead of hiding behind the slow path."""
    monkeypatch.setattr(_ext, "cuda_compiled", lambda: False)
    _fake_import(monkeypatch, "r1engine.kernels.linear_grpo_loss", RuntimeError("triton: no CUDA driver found"))
    with pytest.raises(RuntimeError, match="no CUDA driver found"):
        registry.get("linear_grpo_loss").resolve("auto", CUDA)


def test_compiled_kernel_checks_tell_a_missing_build_from_a_broken_one(monkeypatch, simulated):
    if _ext.available():
        assert registry.compiled_op("no_such_operator")() == registry.Unavailable(
            "r1engine's compiled extension has no operator 'no_such_operator' (built from older sources: rebuild it)",
            broken=True,
        )
    monkeypatch.setattr(_ext, "_load", lambda: ModuleNotFoundError("No module named 'r1engine._C'", name="r1engine._C"))
    why = registry.compiled_op("rms_norm_fwd")()
    assert why is not None and not why.broken and "is not built" in why.reason
    assert registry.get("rms_norm").resolve("auto", CPU, torch.float32) == "torch"
    monkeypatch.setattr(_ext, "_load", lambda: ImportError("r1engine/_C.so: undefined symbol: _ZN3c10"))
    why = registry.compiled_op("rms_norm_fwd")()
    assert why is not None and why.broken and "fails to load" in why.reason and "undefined symbol" in why.reason
    with pytest.raises(RuntimeError, match="rms_norm: backend='cpp' is unavailable here: .*undefined symbol"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cpp")


def test_the_suite_fails_a_test_that_runs_into_a_broken_fast_path(tmp_path):
    """tests/conftest.py turns a broken fast path met during a test into an error of that test."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_broken.py").write_text(
        textwrap.dedent(
            """
            from r1engine.ops.backends import registry

            def test_meets_a_broken_kernel():
                why = registry.Unavailable("import r1engine.kernels.x failed (ImportError: boom)", broken=True)
                registry.report("some_op", "triton", why, using="torch")

            def test_meets_a_missing_package():
                registry.report("some_op", "flash", registry.Unavailable("flash_attn is not installed"), using="sdpa")
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_broken.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert "2 passed, 1 error" in run.stdout, run.stdout + run.stderr
    assert "some_op: backend 'triton': import r1engine.kernels.x failed (ImportError: boom)" in run.stdout
