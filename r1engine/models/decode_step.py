"""`FusedDecodeStep`: one single-token decode step of a `PolicyModel` in one C++ call.

`torch.ops.r1engine.decode_step` (csrc/torch/decode_step_ops.cpp) runs the main model from the last sampled token
of every row to its next-token logits, writing the new keys and values into the `KVCache`: the same GEMMs and
the same fused kernels as the eager forward with a cache (`PolicyModel.forward(..., kv_cache=cache)` followed by
`PolicyModel.logits`), so the logits and the cache are bitwise equal to it, without the eager forward's Python and
dispatch overhead (~1.3 ms of a ~5 ms step at the demo policy's 64 rows; benchmarks/bench_decode_step.py).

The native rollout engine uses it for its non-speculative decode steps whenever `FusedDecodeStep.build` accepts
the model and cache (CPU, fp32 or bf16, the operator compiled, and the eager path itself on its kernels: fused layer
ops and the decode-attention kernel enabled). `USE_FUSED_DECODE_STEP = False` turns it off for comparisons.
"""

from __future__ import annotations

import torch

from r1engine import _ext
from r1engine.models import kv_cache as kv_cache_module
from r1engine.models import policy as policy_module
from r1engine.models.kv_cache import KVCache
from r1engine.models.policy import PolicyModel, rope_cos_sin

USE_FUSED_DECODE_STEP = True
"""False: `FusedDecodeStep.build` returns None and decoding takes the eager forward."""

_LAYER_WEIGHTS = (  # the operator's per-layer order (LayerSlot in decode_step_ops.cpp)
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def decode_weights(model: PolicyModel) -> list[torch.Tensor]:
    """The main model's weights in the operator's order: 12 per layer, then the final norm, lm_head, embedding."""
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        params = dict(layer.named_parameters())
        weights += [params[name] for name in _LAYER_WEIGHTS]
    return weights + [model.model.norm.weight, model.lm_head.weight, model.model.embed_tokens.weight]


class FusedDecodeStep:
    """Decode steps of one model over one generation's cache; build with `FusedDecodeStep.build`."""

    def __init__(self, model: PolicyModel) -> None:
        self._weights = [w.detach() for w in decode_weights(model)]
        self._config = model.config

    @classmethod
    def build(cls, model: PolicyModel, cache: KVCache) -> FusedDecodeStep | None:
        """A step function for `model` decoding into `cache`, or None where the operator does not apply (then the
        eager forward is the way, and it is what the fused step would have to equal)."""
        dtype = cache.k.dtype
        supported = (
            USE_FUSED_DECODE_STEP
            and _ext.has_op("decode_step")
            and cache.k.device.type == "cpu"
            and model.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and model.dtype == dtype
            and cache.k.shape[0] == model.config.num_layers
            and policy_module._FUSED_LAYER_OPS
            and kv_cache_module.USE_DECODE_KERNEL
        )
        return cls(model) if supported else None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits `[B, V]` of the next token after `tokens` `[B]`, each at its row's position `cache.lengths`
        (capped at the last position embedding, as the engine's eager steps); writes the new keys and values at
        slot `cache.lengths` and leaves committing them to the caller (`cache.advance`)."""
        cfg = self._config
        positions = cache.lengths[:, None].clamp(max=cfg.max_position_embeddings - 1)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # the eager step's tables, bit for bit
        step, weights, heads, eps = torch.ops.r1engine.decode_step, self._weights, cfg.num_heads, cfg.rms_norm_eps
        return step(tokens, cos[:, 0], sin[:, 0], cache.k, cache.v, cache.lengths, weights, heads, eps)
