"""Sampling parameters and the processed target distribution (temperature, top-k, top-p) shared by the engines."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """What `generate` samples with. temperature == 0 means greedy; top_k = -1 and top_p = 1 disable filtering."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution the sampler draws from: softmax(logits / T) restricted to top-k then top-p, renormalised
    (fp32). Greedy returns the one-hot of the argmax. This is also the `p` of the speculative acceptance rule."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / cfg.temperature
    if cfg.top_k != -1 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token: keep while < top_p
        keep_sorted = before < cfg.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` `[..., V]` (inverse-CDF on a uniform; works on any device)."""
    flat = probs.reshape(-1, probs.shape[-1])
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=torch.float64)
    cdf = flat.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp(min=1e-300)
    idx = torch.searchsorted(cdf, u).clamp(max=flat.shape[-1] - 1)
    # never land on a zero-probability token because of rounding at the boundary
    bad = flat.gather(-1, idx) <= 0
    if bool(bad.any()):
        idx[bad] = flat[bad.squeeze(-1)].argmax(-1, keepdim=True).squeeze(-1)
    return idx.reshape(probs.shape[:-1])
