"""The layers of `PolicyModel` (`r1engine.models.policy`): RMSNorm, GQA attention with RoPE, the SwiGLU MLP, the
pre-norm decoder block, the MiMo MTP block and the `model.*` body that holds them, with the Hugging Face parameter
names.

The element-wise parts of a layer (RMSNorm, SwiGLU, RoPE) go through r1engine's fused operators (backend "auto": the
C++ kernels for fp32/bf16 CPU tensors, else the same formulas in PyTorch), which save fewer activations for the
backward pass than the op-by-op graph; `r1engine.settings` `fused_layer_ops=False` switches them to the op-by-op
references (same math) for comparisons (benchmarks/bench_layers.py). Packed rows attend through
`r1engine.packing.attention.varlen_attention` with the backend `settings.attention_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1engine.models import decode_step
from r1engine.models.config import PolicyConfig
from r1engine.models.kv_cache import KVCache
from r1engine.ops.rms_norm import rms_norm, rms_norm_reference
from r1engine.ops.rope import rope, rope_reference
from r1engine.ops.swiglu import swiglu, swiglu_reference
from r1engine.packing.attention import varlen_attention
from r1engine.settings import current as current_settings

__all__ = ["Attention", "Body", "DecoderLayer", "LayerContext", "MLP", "MTPLayer", "RMSNorm", "apply_rope"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as Qwen2 and vLLM do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if current_settings().fused_layer_ops:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[..., T, H, D]` rotated by cos/sin `[..., T, D]` (no gradient to cos/sin)."""
    if current_settings().fused_layer_ops:
        return rope(x, cos, sin)
    return rope_reference(x, cos, sin)


@dataclass
class LayerContext:
    """What every attention layer of one forward shares: the rotary tables, the packed layout or the KV cache."""

    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    cache: KVCache | None = None
    layer_offset: int = 0


class Attention(nn.Module):
    """GQA attention with RoPE; q/k/v and o biases and the per-head q/k RMSNorm (Qwen3) as the config says."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, ctx: LayerContext, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.d)
        k = self.k_proj(x).view(b, t, self.hkv, self.d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        v = self.v_proj(x).view(b, t, self.hkv, self.d)
        if ctx.cache is not None:
            o = ctx.cache.attend(layer_idx - ctx.layer_offset, q, k, v)
        elif ctx.cu_seqlens is not None:
            backend = current_settings().attention_backend
            o = varlen_attention(q[0], k[0], v[0], ctx.cu_seqlens, ctx.max_seqlen, causal=True, backend=backend)[None]
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        return self.o_proj(o.reshape(b, t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = swiglu if current_settings().fused_layer_ops else swiglu_reference
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block (Qwen2)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: LayerContext, layer_idx: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(DecoderLayer):
    """One MiMo MTP module: the block's weights sit directly under `model.mtp_layers.{i}.` as in MiMo checkpoints."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__(cfg)
        self.token_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward_mtp(
        self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: LayerContext, idx: int
    ) -> torch.Tensor:
        x = self.input_proj(torch.cat([self.hidden_layernorm(prev_hidden), self.token_layernorm(next_embeds)], -1))
        if ctx.cache is not None and decode_step.decoder_layers_apply(x, ctx.cache):  # drafting: one C++ call
            return self.final_layernorm(decode_step.decoder_layers([self], x, ctx.cos, ctx.sin, ctx.cache))
        return self.final_layernorm(DecoderLayer.forward(self, x, ctx, idx))


class Body(nn.Module):
    """`model.*` of the checkpoint: embedding, decoder layers, final norm, MTP layers."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp_layers = nn.ModuleList([MTPLayer(cfg) for _ in range(cfg.num_mtp_layers)])
