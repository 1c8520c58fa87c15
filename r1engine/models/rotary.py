"""Rotary position tables: the inverse frequencies of every RoPE scaling the supported families use, and cos/sin.

The formulas are those of transformers' `modeling_rope_utils` (the oracle in tests/test_models_hf.py), computed in
float64 so that the tables are at least as exact as transformers' float32 ones. Scalings that depend on the running
sequence length (`dynamic`) or on per-position factor lists (`longrope`) are rejected: the policy, its KV cache and
vLLM must agree on one table.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The scaling's `rope_type` (older configs say `type`); "default" without scaling."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise a ValueError naming `rope_scaling.<key>` when the scaling is unsupported or incomplete."""
    kind = rope_type_of(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type: {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "'dynamic' rescales with the running length and 'longrope' per position, which the KV cache and vLLM "
            "could not share"
        )
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), "yarn": ("original_max_position_embeddings",)}  # fmt: skip
    for key in required.get(kind, ()):
        if scaling.get(key) is None:  # type: ignore[union-attr]
            raise ValueError(f"rope_scaling.{key}: required for rope_type {kind!r}")
    if kind != "default" and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:  # type: ignore[union-attr]
        raise ValueError("rope_scaling.partial_rotary_factor: only 1.0 (rotate the whole head) is supported")


def _yarn(
    inv: torch.Tensor, dim: int, base: float, s: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    return inv / factor * (1 - extrapolation) + inv * extrapolation, float(attention)


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low_f, inv / factor, inv)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high_f) & ~(wavelen > old_len / low_f)
    return torch.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(head_dim: int, theta: float, scaling: tuple, max_positions: int) -> tuple[torch.Tensor, float]:
    s = dict(scaling)
    kind = rope_type_of(s)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, s), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, s, max_positions)
    return inv, 1.0


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, max_positions: int = 0
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float64 `[head_dim / 2]`, attention scaling applied to cos and sin) of a RoPE config."""
    check_rope_scaling(scaling)
    return _inverse_frequencies(int(head_dim), float(theta), _freeze(scaling or {}), int(max_positions))


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    max_positions: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin float32 `[..., head_dim]` for integer positions (NeoX half-rotation layout), scaled as `scaling`
    says (`max_positions`: the model's max_position_embeddings, which yarn reads when it has no factor)."""
    inv, attention = inverse_frequencies(head_dim, theta, scaling, max_positions)
    ang = positions.to(torch.float64)[..., None] * inv.to(positions.device)
    ang = torch.cat([ang, ang], dim=-1)
    if attention == 1.0:
        return ang.cos().float(), ang.sin().float()
    return (ang.cos() * attention).float(), (ang.sin() * attention).float()
