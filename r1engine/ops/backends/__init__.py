"""Backend modules of the fused GRPO-loss contract and the rule that picks one.

Each backend module exposes the same three functions (see ``torch_ref`` for the exact semantics):
``token_logprobs_fwd(logits, targets, temperature)``,
``grpo_fwd(logits, targets, advantages, old_logp, ref_logp, weights, *, temperature, eps_low, eps_high, dual_clip,
beta, kl_estimator)`` and ``logprobs_bwd(logits, targets, lse, dlogp, *, temperature, inplace)``.

Names: ``"torch"`` (pure PyTorch reference), ``"cpp"`` (C++ CPU kernel), ``"cuda"`` (CUDA kernel; ``cpp`` and
``cuda`` share the compiled operators, which dispatch by device), ``"triton"`` (``r1engine.kernels.grpo_loss``),
``"auto"``: CUDA tensors -> cuda if compiled, else triton, else torch; CPU tensors -> cpp if built, else torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from r1engine import _ext

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

__all__ = ["BACKENDS", "LAYER_BACKENDS", "resolve", "resolve_cpu_kernel", "load"]


def _triton_available() -> bool:
    try:
        importlib.import_module("r1engine.kernels.grpo_loss")
    except Exception:  # noqa: BLE001  (triton missing, or the module not written yet)
        return False
    return True


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` (possibly ``"auto"``) on tensors living on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if _ext.cuda_compiled() and _ext.has_op("grpo_fwd"):
            return "cuda"
        if _triton_available():
            return "triton"
        return "torch"
    return "cpp" if _ext.has_op("grpo_fwd") else "torch"


def load(backend: str) -> ModuleType:
    """The backend module for a concrete backend name; raises a clear error when it is unavailable."""
    if backend == "torch":
        from r1engine.ops.backends import torch_ref

        return torch_ref
    if backend in ("cpp", "cuda"):
        from r1engine.ops.backends import compiled

        if backend == "cuda" and not _ext.cuda_compiled():
            raise RuntimeError(
                "backend='cuda' needs r1engine's extension built with CUDA (a CUDA toolkit and a CUDA build of "
                "torch at build time); use backend='triton' or 'torch'"
            )
        _ext.require("grpo_fwd")
        return compiled
    if backend == "triton":
        try:
            return importlib.import_module("r1engine.kernels.grpo_loss")
        except ImportError as exc:
            raise RuntimeError(
                f"backend='triton' is unavailable ({type(exc).__name__}: {exc}); it needs the `triton` package "
                "(and a GPU, or TRITON_INTERPRET=1 on CPU); use backend='cpp' or 'torch'"
            ) from exc
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


LAYER_BACKENDS = ("auto", "torch", "cpp")
"""Backends of the fused layer ops (rms_norm, swiglu, rope): the C++ CPU kernel or the same formulas in PyTorch."""

_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def resolve_cpu_kernel(backend: str, x: torch.Tensor, arg: str, kernel: str) -> str:
    """The concrete backend ("cpp" or "torch") of a fused layer op whose C++ CPU kernel is
    ``torch.ops.r1engine.<kernel>``, for its input ``x`` (named ``arg`` in errors). "auto" picks the kernel for
    fp32/bf16 CPU tensors when the extension has it, else "torch" (CUDA tensors too, until they have kernels)."""
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"backend: expected one of {LAYER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        cpp = x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES and _ext.has_op(kernel)
        return "cpp" if cpp else "torch"
    if backend == "cpp":
        _ext.require(kernel)
        if x.device.type != "cpu":
            raise ValueError(f"{arg}: backend 'cpp' runs on CPU tensors, got device {x.device}; use backend='torch'")
        if x.dtype not in _CPU_KERNEL_DTYPES:
            raise TypeError(f"{arg}: backend 'cpp' expects float32 or bfloat16, got {x.dtype}; use backend='torch'")
    return backend
