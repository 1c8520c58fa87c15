"""Loading of the compiled core `r1engine._C` and queries about what it was built with."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _load() -> ImportError | None:
    try:
        import r1engine._C  # noqa: F401  (registers torch.ops.r1engine.*)
    except ImportError as exc:  # not built, or built against another torch
        return exc
    return None


def load_error() -> str | None:
    """None if the extension loaded, else the reason it did not (kept for `r1engine.info`)."""
    exc = _load()
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def built() -> bool:
    """False only when there is no extension to load (never built in this checkout or install); True when it loaded,
    and when a built one fails to load (e.g. built against another torch: a broken build, not a missing one)."""
    exc = _load()
    return not (isinstance(exc, ModuleNotFoundError) and exc.name == "r1engine._C")


def available() -> bool:
    """True when the compiled extension is importable."""
    return load_error() is None


def has_op(name: str) -> bool:
    """True when the compiled extension provides the operator torch.ops.r1engine.<name>."""
    return available() and hasattr(torch.ops.r1engine, name)


@functools.cache
def build_info() -> dict[str, str]:
    """Features the extension was compiled with, e.g. {'openmp': '1', 'cuda': '0', 'simd': 'avx512'}."""
    if not available():
        return {}
    return dict(item.split("=", 1) for item in torch.ops.r1engine.build_info().split(";"))


def cuda_compiled() -> bool:
    """True when the extension contains the CUDA kernels (built on a machine with a CUDA toolkit)."""
    return build_info().get("cuda") == "1"


def require(op_name: str) -> None:
    """Raise a clear error when a compiled operator is needed but missing."""
    if not available():
        raise RuntimeError(
            f"r1engine's compiled extension is not available ({load_error()}); build it with "
            "`pip install --no-build-isolation -e .` or pick backend='torch'"
        )
    if not hasattr(torch.ops.r1engine, op_name):
        raise RuntimeError(f"r1engine's compiled extension has no operator '{op_name}'; rebuild it")
