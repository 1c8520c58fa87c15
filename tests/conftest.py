"""Session-wide test setup.

Without a CUDA device the Triton kernels run under Triton's interpreter. `TRITON_INTERPRET` is read when a kernel is
decorated, that is when `r1engine.kernels` is first imported, and several test modules import it indirectly while
they are collected (the fused ops, TRL through its Liger integration), so it is set here, before any of them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
