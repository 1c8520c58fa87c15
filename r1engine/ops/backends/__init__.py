"""Backend modules of the GRPO losses' vocabulary pass, and the registered backends of both GRPO losses.

Each backend module exposes the same two functions (see ``torch_ref`` for the exact semantics):
``logprobs_fwd(logits, targets, *, temperature, live, entropy) -> (logp, lse, entropy)`` and
``logprobs_bwd(logits, targets, lse, dlogp, *, temperature, inplace, dentropy, entropy)``. The loss math between
them is one PyTorch implementation for all (``r1engine.algo.policy_loss``).

Names (``GRPO_LOSS``, see ``r1engine.ops.backends.registry`` for the rule that resolves "auto" and what is logged
when a fast path is passed over): ``"torch"`` (pure PyTorch reference), ``"cpp"`` (C++ CPU kernel), ``"cuda"``
(CUDA kernel; ``cpp`` and ``cuda`` share the compiled operators, which dispatch by device), ``"triton"``
(``r1engine.kernels.grpo_loss``), ``"auto"``: CUDA tensors -> cuda if compiled, else triton, else torch; CPU tensors
-> cpp if built, else torch.

``LINEAR_GRPO_LOSS``: the backends of ``r1engine.ops.linear_grpo_loss`` (``"triton"`` for CUDA tensors when the
kernel imports, else ``"torch"``).

The fused layer ops (rms_norm, swiglu, rope) register theirs with ``cpu_kernel_op`` and resolve with
``resolve_cpu_kernel``: the C++ CPU kernel or the same formulas in PyTorch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from r1engine import _ext
from r1engine.ops.backends.registry import Backend, OpBackends, compiled_op, importable, register

__all__ = [
    "BACKENDS",
    "GRPO_LOSS",
    "LINEAR_GRPO_LOSS",
    "cpu_kernel_op",
    "load",
    "resolve",
    "resolve_cpu_kernel",
]

GRPO_LOSS = register(
    "grpo_loss",
    [
        Backend(
            "cuda",
            "CUDA kernel (csrc/cuda/grpo_loss.cu)",
            auto_devices=("cuda",),
            check=compiled_op("logprobs_fwd", cuda=True),
        ),
        Backend(
            "triton",
            "Triton kernel (r1engine.kernels.grpo_loss)",
            auto_devices=("cuda",),
            check=importable("r1engine.kernels.grpo_loss", optional=("triton",)),
        ),
        Backend(
            "cpp", "C++ CPU kernel (csrc/core/grpo_loss.cpp)", auto_devices=("cpu",), check=compiled_op("logprobs_fwd")
        ),
        Backend("torch", "pure-PyTorch reference (r1engine.ops.backends.torch_ref)"),
    ],
)
BACKENDS = GRPO_LOSS.names

LINEAR_GRPO_LOSS = register(
    "linear_grpo_loss",
    [
        Backend(
            "triton",
            "Triton tile GEMM + online log-sum-exp (r1engine.kernels.linear_grpo_loss)",
            auto_devices=("cuda",),
            check=importable("r1engine.kernels.linear_grpo_loss", optional=("triton",)),
        ),
        Backend("torch", "chunked pure-PyTorch reference"),
    ],
)


def resolve(backend: str, device: torch.device) -> str:
    """The concrete GRPO-loss backend for ``backend`` (possibly ``"auto"``) on tensors living on ``device``."""
    return GRPO_LOSS.resolve(backend, device)


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
        _ext.require("logprobs_fwd")
        return compiled
    if backend == "triton":
        try:
            return importlib.import_module("r1engine.kernels.grpo_loss")
        except ImportError as exc:
            raise RuntimeError(
                f"backend='triton' is unavailable ({type(exc).__name__}: {exc}); it needs the `triton` package "
                "(and a GPU, or TRITON_INTERPRET=1 on CPU); use backend='cpp' or 'torch'"
            ) from exc
    GRPO_LOSS.validate(backend)
    raise ValueError(f"backend: expected a concrete backend for grpo_loss (not 'auto'), got {backend!r}")


# ---------------------------------------------------------------------------------------------- fused layer ops
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def cpu_kernel_op(op: str, kernel: str) -> OpBackends:
    """Register the backends of a fused layer op whose C++ CPU kernel is ``torch.ops.r1engine.<kernel>``: "cpp"
    ("auto" picks it for fp32/bf16 CPU tensors when the extension has the kernel; CUDA tensors take "torch" until
    they have kernels) and "torch" (the same formulas in PyTorch, any device and float dtype)."""
    return register(
        op,
        [
            Backend(
                "cpp",
                f"C++ CPU kernel torch.ops.r1engine.{kernel} (float32, bfloat16)",
                auto_devices=("cpu",),
                auto_dtypes=_CPU_KERNEL_DTYPES,
                check=compiled_op(kernel),
            ),
            Backend("torch", "the same formulas in PyTorch (any device and float dtype)"),
        ],
    )


def resolve_cpu_kernel(op: OpBackends, backend: str, x: torch.Tensor, arg: str) -> str:
    """The concrete backend ("cpp" or "torch") of the fused layer op ``op`` (registered by ``cpu_kernel_op``) for its
    input ``x`` (named ``arg`` in errors); a named "cpp" must be built and get an fp32/bf16 CPU tensor."""
    name = op.resolve(backend, x.device, x.dtype)
    if name == "cpp" and backend != "auto":
        op.require("cpp")
        if x.device.type != "cpu":
            raise ValueError(f"{arg}: backend 'cpp' runs on CPU tensors, got device {x.device}; use backend='torch'")
        if x.dtype not in _CPU_KERNEL_DTYPES:
            raise TypeError(f"{arg}: backend 'cpp' expects float32 or bfloat16, got {x.dtype}; use backend='torch'")
    return name
