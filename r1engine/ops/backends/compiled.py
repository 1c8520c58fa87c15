"""Compiled backend of the vocabulary-pass contract: calls ``torch.ops.r1engine.*``.

The same operators dispatch by device: the C++ CPU kernel (``csrc/core/grpo_loss.cpp``, backend ``"cpp"``) for
CPU tensors and the CUDA kernel (``csrc/cuda/grpo_loss.cu``, backend ``"cuda"``) for CUDA tensors. Semantics:
``r1engine.ops.backends.torch_ref``.
"""

from __future__ import annotations

import torch

from r1engine import _ext

__all__ = ["logprobs_fwd", "logprobs_bwd", "available"]


def available() -> bool:
    """True when the compiled extension provides the vocabulary-pass operators."""
    return _ext.has_op("logprobs_fwd")


def _float_vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    live: torch.Tensor | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy)`` in fp32 from ``logits [N, V]`` and int64 ``targets [N]``."""
    _ext.require("logprobs_fwd")
    return torch.ops.r1engine.logprobs_fwd(
        logits, targets.long().contiguous(), _float_vec(live), float(temperature), bool(entropy)
    )


def logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    *,
    temperature: float,
    inplace: bool,
    dentropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits' gradient in their dtype; written into ``logits`` when ``inplace``."""
    args = (targets.long().contiguous(), _float_vec(lse), _float_vec(dlogp), _float_vec(dentropy), _float_vec(entropy))
    if inplace:
        _ext.require("logprobs_bwd_")
        torch.ops.r1engine.logprobs_bwd_(logits, *args, float(temperature))
        return logits
    _ext.require("logprobs_bwd")
    return torch.ops.r1engine.logprobs_bwd(logits, *args, float(temperature))
