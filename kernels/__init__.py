"""Triton kernels of r1engine (importable as `r1engine.kernels`).

Triton is optional: on a machine without a GPU the kernels still run under TRITON_INTERPRET=1 (slowly),
which is how the tests exercise them on CPU.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
