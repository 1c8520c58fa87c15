"""Decoding through the KV cache in one C++ call: `FusedDecodeStep` and `decoder_layers`.

`torch.ops.r1engine.decode_step` (csrc/torch/decode_step_ops.cpp) runs the main model from the last sampled token
of every row to its next-token logits, writing the new keys and values into the `KVCache`: the same GEMMs and
the same fused kernels as the eager forward with a cache (`PolicyModel.forward(..., kv_cache=cache)` followed by
`PolicyModel.logits`), so the logits and the cache are bitwise equal to it, without the eager forward's Python and
dispatch overhead (benchmarks/bench_decode_step.py). The native rollout engine uses it for its non-speculative
decode steps.

`torch.ops.r1engine.decode_layers` is the stack of decoder layers alone, over any number T of new tokens per row
(hidden states in, hidden states out, the cache written): `PolicyModel` runs its layers and its MTP layer through it
whenever it decodes with a cache where the operator applies (`decoder_layers_apply`), which is what speculative
decoding does (verifying k+1 tokens per row, then drafting with the MTP layer). With one token per row it equals the
eager layers bit for bit; with T > 1 the eager layers attend through SDPA with a ragged mask and the operator
through the decode-attention kernel (one query per row at a time), equal to ~1e-7.

Both serve every family `PolicyModel` loads (Qwen2/MiMo, Llama, Qwen3): the families differ only in optional
attention pieces (q/k/v biases, an o_proj bias, Qwen3's per-head q/k RMSNorm before RoPE, a head_dim other than
hidden / heads), so the operators take one fixed slot layout per layer (`LAYER_SLOTS`) with an empty tensor where a
piece is absent, and one compiled path covers all of them. The head width comes from the cache, never from hidden /
heads.

Both apply on the CPU to fp32 and bf16 models without autograd, with the operators compiled, and only while the
eager path itself runs on its kernels (`r1engine.settings`: `fused_layer_ops` and `decode_attention_kernel` on).
`settings.override(fused_decode_step=False)` turns both off for comparisons. Where the fused step does not apply,
`FusedDecodeStep.build` says why once (`r1engine.ops.backends.registry.report`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from r1engine import _ext
from r1engine.models.kv_cache import KVCache
from r1engine.ops.backends import registry
from r1engine.settings import current as current_settings

if TYPE_CHECKING:
    from r1engine.models.layers import DecoderLayer
    from r1engine.models.policy import PolicyModel

LAYER_SLOTS = (  # the operators' per-layer order (LayerSlot in decode_step_ops.cpp); "?": empty where absent
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias?",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias?",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias?",
    "self_attn.q_norm.weight?",
    "self_attn.k_norm.weight?",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias?",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@functools.cache
def _absent(dtype: torch.dtype) -> torch.Tensor:
    """The empty tensor that fills an absent slot (one per dtype, never written)."""
    return torch.empty(0, dtype=dtype)


def _layer_slots(layer: DecoderLayer) -> tuple[torch.Tensor, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    none = _absent(q.weight.dtype)
    qb, kb, vb, ob = q.bias, k.bias, v.bias, o.bias
    qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (none, none)
    return (
        layer.input_layernorm.weight,
        q.weight,
        none if qb is None else qb,
        k.weight,
        none if kb is None else kb,
        v.weight,
        none if vb is None else vb,
        qn,
        kn,
        o.weight,
        none if ob is None else ob,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
    )


def layer_weights(layers: Sequence[DecoderLayer]) -> list[torch.Tensor]:
    """The weights of `layers` in the operators' order, `len(LAYER_SLOTS)` per layer, an empty tensor for each piece
    the family lacks (attribute reads and a cached empty tensor: this runs every decode step of `decoder_layers`)."""
    return [w for layer in layers for w in _layer_slots(layer)]


def decode_weights(model: PolicyModel) -> list[torch.Tensor]:
    """The main model's weights in `decode_step`'s order: `len(LAYER_SLOTS)` per layer (empty tensors for absent
    pieces), then the final norm, lm_head, embedding."""
    tail = [model.model.norm.weight, model.lm_head.weight, model.model.embed_tokens.weight]
    return [w.detach() for w in layer_weights(model.model.layers) + tail]


def _kernels_apply(dtype: torch.dtype, cache: KVCache, op: str) -> bool:
    switches = current_settings()
    return (
        switches.fused_decode_step
        and _ext.has_op(op)
        and cache.k.device.type == "cpu"
        and dtype == cache.k.dtype
        and dtype in (torch.float32, torch.bfloat16)
        and switches.fused_layer_ops
        and switches.decode_attention_kernel
    )


MAX_DECODE_TOKENS = 8
"""Forwards of at most this many new tokens per row are decode steps (one token, or a speculative verify of k+1);
longer ones are prefills, which keep the eager layers: SDPA serves many queries per row at once, where the decode
kernel takes one query per row and call."""


def decoder_layers_apply(x: torch.Tensor, cache: KVCache) -> bool:
    """Whether `decoder_layers` runs the layers of a cached forward of hidden states `x` `[B, T, H]`: a decode-sized
    T (<= MAX_DECODE_TOKENS) without autograd, on the CPU, where the kernels apply."""
    return (
        x.dim() == 3
        and x.shape[1] <= MAX_DECODE_TOKENS
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and _kernels_apply(x.dtype, cache, "decode_layers")
    )


def decoder_layers(
    layers: Sequence[DecoderLayer], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """`layers` (as many as `cache` holds) over the new tokens' hidden states `x` `[B, T, H]` at rotary tables
    cos/sin `[B, T, D]`: token t of row b is written at cache slot `cache.lengths[b] + t` and attends to the slots
    before it. Returns `[B, T, H]`; the caller commits the slots (`cache.advance`)."""
    attn, norm = layers[0].self_attn, layers[0].input_layernorm
    return torch.ops.r1engine.decode_layers(
        x, cos.float(), sin.float(), cache.k, cache.v, cache.lengths, layer_weights(layers), attn.hq, norm.eps
    )


_DECODE_STEP_BUILT = registry.compiled_op("decode_step")


def _report_eager(model: PolicyModel, cache: KVCache) -> None:
    """Say once per reason why decoding takes the eager forward (a broken build is a warning, the rest is info)."""
    why = _DECODE_STEP_BUILT()
    if why is None:
        if model.device.type != "cpu" or cache.k.device.type != "cpu":
            reason = f"the model is on {model.device} (the operator is a CPU one)"
        elif model.dtype not in (torch.float32, torch.bfloat16) or model.dtype != cache.k.dtype:
            reason = f"dtype {model.dtype} with a {cache.k.dtype} cache (float32 / bfloat16 only)"
        elif cache.k.shape[0] != model.config.num_layers:
            reason = f"the cache holds {cache.k.shape[0]} layers, the model {model.config.num_layers}"
        else:
            reason = "the fused layer ops or the decode-attention kernel are switched off (r1engine.settings)"
        why = registry.Unavailable(reason)
    registry.report("decode_step", "fused", why, using="eager")


class FusedDecodeStep:
    """Decode steps of one model over one generation's cache; build with `FusedDecodeStep.build`."""

    def __init__(self, model: PolicyModel) -> None:
        self._weights = decode_weights(model)
        self._config = model.config

    @classmethod
    def build(cls, model: PolicyModel, cache: KVCache) -> FusedDecodeStep | None:
        """A step function for `model` decoding into `cache`, or None where the operator does not apply (then the
        eager forward is the way, and it is what the fused step would have to equal)."""
        supported = (
            model.device.type == "cpu"
            and cache.k.shape[0] == model.config.num_layers
            and _kernels_apply(model.dtype, cache, "decode_step")
        )
        if not supported and current_settings().fused_decode_step:
            _report_eager(model, cache)
        return cls(model) if supported else None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits `[B, V]` of the next token after `tokens` `[B]`, each at its row's position `cache.lengths`
        (capped at the last position embedding, as the engine's eager steps); writes the new keys and values at
        slot `cache.lengths` and leaves committing them to the caller (`cache.advance`)."""
        cfg = self._config
        positions = cache.lengths[:, None].clamp(max=cfg.max_position_embeddings - 1)
        cos, sin = cfg.rope_cos_sin(positions)  # the eager step's, bit for bit
        step, weights, heads, eps = torch.ops.r1engine.decode_step, self._weights, cfg.num_heads, cfg.rms_norm_eps
        return step(tokens, cos[:, 0], sin[:, 0], cache.k, cache.v, cache.lengths, weights, heads, eps)
