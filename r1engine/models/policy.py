"""`PolicyModel`: a decoder-only causal LM of the Qwen2 / Llama / Qwen3 family with DeepSeek-V3/MiMo
multi-token-prediction (MTP) layers.

Main model: token embedding -> N x [RMSNorm -> GQA attention with RoPE (q/k/v and o biases and per-head q/k RMSNorm
as `PolicyConfig` says: Qwen2, Llama, Qwen3) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm ->
lm_head. MTP layer k (MiMo structure, what vLLM's
`MiMoMTP` computes): `final_layernorm(block(input_proj([hidden_layernorm(h_{k-1}); token_layernorm(emb(t_{+k}))])))`
followed by the shared lm_head, where h_0 is the main model's last hidden state *before* its final norm; it predicts
the token after next; its block is one decoder layer of the body's family. Parameter names equal the Hugging Face
checkpoint names (MiMo's for the MTP layers), so `state_dict()` is the checkpoint.

Inputs are either a padded batch `[B, T]`, a packed row (`[1, total]` or `[total]` with `cu_seqlens` and
`position_ids` restarting at 0 per sequence), or a batch with a `KVCache` (incremental decoding).

The layers are in `r1engine.models.layers`; which fast paths they take is `r1engine.settings`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1engine.models import checkpoint, decode_step
from r1engine.models.config import PolicyConfig
from r1engine.models.kv_cache import KVCache
from r1engine.models.layers import Body, LayerContext

__all__ = ["LMHead", "ModelOutput", "PolicyModel"]


# ----------------------------------------------------------------------------------------------------- outputs
@dataclass
class ModelOutput:
    """Result of `PolicyModel.forward`.

    `hidden`: final-normed hidden states (what lm_head reads; hand it with `lm_head.weight` to a fused loss so
    logits never materialise). `last_hidden`: the same before the final norm (the MTP layers' input, as in vLLM).
    `logits` is computed on first access and cached.
    """

    hidden: torch.Tensor
    last_hidden: torch.Tensor
    _head: nn.Linear = field(repr=False)
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._head(self.hidden)
        return self._logits


def _shift_within_sequences(
    ids: torch.Tensor, shift: int, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids shifted left by `shift` along the last dim, and a validity mask (False where it would cross a sequence)."""
    t = ids.shape[-1]
    out = torch.zeros_like(ids)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    if shift < t:
        out[..., : t - shift] = ids[..., shift:]
        valid[..., : t - shift] = True
    if cu_seqlens is not None:
        idx = torch.arange(t, device=ids.device)
        seq_end = cu_seqlens[torch.searchsorted(cu_seqlens, idx, right=True)]  # exclusive end of each token's seq
        valid &= (idx + shift < seq_end)[None] if ids.dim() == 2 else idx + shift < seq_end
    return out, valid


class LMHead(nn.Linear):
    """The output projection. `detach_weight=True` lets gradients reach the input but not the weight (the MTP loss
    must not move the shared head). Going through the module call, not `lm_head.weight`, matters under ZeRO-3:
    DeepSpeed gathers a partitioned weight only around its module's forward."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, detach_weight: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight.detach() if detach_weight else self.weight)


class PolicyModel(nn.Module):
    """Qwen2 / Llama / Qwen3 decoder + MiMo MTP layers; see the module docstring."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    # -------------------------------------------------------------------------------------------- construction
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (Qwen2's init)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.is_meta:  # built on the meta device to be loaded from a checkpoint: nothing to initialise
                    continue
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device  # not lm_head: the value model replaces it with an identity

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -------------------------------------------------------------------------------------------- validation
    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"{name} must lie in [0, vocab_size={self.config.vocab_size}), got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    def _prepare(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool]:
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] or a packed [total], got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None:
            if ids.shape[0] != 1:
                raise ValueError(f"packed input (cu_seqlens) must be [1, total] or [total], got {tuple(ids.shape)}")
            if kv_cache is not None:
                raise ValueError("cu_seqlens and kv_cache cannot be combined")
            cu_seqlens = cu_seqlens.to(device=ids.device, dtype=torch.int32)
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != ids.shape[1]:
                raise ValueError(
                    f"cu_seqlens must start at 0 and end at total={ids.shape[1]}, got "
                    f"[{int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}]"
                )
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            if max_seqlen is None:
                max_seqlen = int(lens.max()) if lens.numel() else 0
            if position_ids is None:
                idx = torch.arange(ids.shape[1], device=ids.device)
                seq = torch.searchsorted(cu_seqlens.long(), idx, right=True) - 1
                position_ids = (idx - cu_seqlens.long()[seq])[None]
        if kv_cache is not None:
            if ids.shape[0] != kv_cache.batch_size:
                raise ValueError(f"input_ids batch {ids.shape[0]} != kv_cache batch {kv_cache.batch_size}")
            pos = kv_cache.begin(ids.shape[1])
            position_ids = pos if position_ids is None else position_ids
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        position_ids = position_ids.reshape(ids.shape) if position_ids.numel() == ids.numel() else position_ids
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        return ids, position_ids, cu_seqlens, int(max_seqlen or 0), squeeze

    # -------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
        compute_logits: bool = False,
    ) -> ModelOutput:
        """Main-model forward. Shapes of `hidden`/`last_hidden`/`logits` follow `input_ids` (+ a trailing dim).

        `kv_cache` (a `KVCache` with `num_layers` layers): tokens are appended after each row's committed length;
        the caller commits them with `kv_cache.advance(n)`.
        """
        self._check_ids(input_ids)
        ids, pos, cu, mx, squeeze = self._prepare(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache)
        cos, sin = self.config.rope_cos_sin(pos)
        ctx = LayerContext(cos=cos, sin=sin, cu_seqlens=cu, max_seqlen=mx, cache=kv_cache)
        x = self.model.embed_tokens(ids)
        if kv_cache is not None and decode_step.decoder_layers_apply(x, kv_cache):  # decoding: one C++ call
            x = decode_step.decoder_layers(self.model.layers, x, cos, sin, kv_cache)
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, ctx, i)
        hidden = self.model.norm(x)
        if squeeze:
            x, hidden = x[0], hidden[0]
        out = ModelOutput(hidden=hidden, last_hidden=x, _head=self.lm_head)
        if compute_logits:
            _ = out.logits
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head applied to final-normed hidden states."""
        return self.lm_head(hidden)

    def mtp_hidden(
        self,
        prev_hidden: torch.Tensor,
        next_input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        detach_main: bool = False,
    ) -> torch.Tensor:
        """Output of MTP layer `layer` (after its final norm) at every position.

        Position i combines `prev_hidden[i]` (main model's `last_hidden` for layer 0, the previous MTP layer's
        output otherwise) with the embedding of `next_input_ids[i]` (the token at i+1+layer). As vLLM's MiMo MTP,
        the token embedding is zeroed at position 0. `kv_cache` must have exactly one layer (the MTP block's).
        """
        n_mtp = self.config.num_mtp_layers
        if not 0 <= layer < n_mtp:
            raise ValueError(f"MTP layer {layer} requested but the model has num_mtp_layers={n_mtp}")
        self._check_ids(next_input_ids, "next_input_ids")
        ids, pos, cu, mx, squeeze = self._prepare(next_input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache)
        h = prev_hidden[None] if squeeze else prev_hidden
        if h.shape[:2] != ids.shape:
            raise ValueError(f"prev_hidden {tuple(prev_hidden.shape)} does not match next_input_ids {tuple(ids.shape)}")
        e = self.model.embed_tokens(ids)  # a module call, not the weight itself: see LMHead
        if detach_main:  # the embedding's output carries the only gradient path to its weight
            e, h = e.detach(), h.detach()
        e = torch.where(pos.unsqueeze(-1) == 0, torch.zeros_like(e), e)
        cos, sin = self.config.rope_cos_sin(pos)
        ctx = LayerContext(cos=cos, sin=sin, cu_seqlens=cu, max_seqlen=mx, cache=kv_cache, layer_offset=0)
        out = self.model.mtp_layers[layer].forward_mtp(h.to(e.dtype), e, ctx, 0)
        return out[0] if squeeze else out

    def mtp_logits(
        self,
        hidden: torch.Tensor,
        next_input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Logits of the draft head: position i predicts the token at i+2+layer from `hidden[i]` (pre-norm
        `ModelOutput.last_hidden`) and `next_input_ids[i]` (the token at i+1+layer)."""
        h = self.mtp_hidden(hidden, next_input_ids, position_ids, cu_seqlens, max_seqlen, layer=layer)
        return self.lm_head(h)

    def mtp_loss(
        self,
        input_ids: torch.Tensor,
        last_hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        loss_mask: torch.Tensor | None = None,
        lam: float = 0.1,
        detach_main: bool = True,
    ) -> torch.Tensor:
        """DeepSeek-V3's MTP loss `(lam / D) * sum_k CE_k`, CE_k the mean cross-entropy of the token k+1 ahead.

        `last_hidden` is `forward(...).last_hidden` for the same `input_ids`. `loss_mask` (same shape as input_ids)
        selects which *target* tokens count (e.g. completion tokens only); targets never cross packed-sequence
        boundaries. `detach_main=True` (default) stops this loss from moving the policy (hidden states, shared
        embedding and head are detached), so it only keeps the draft head following the policy in RL; set it
        False for pre-training-style joint training.
        """
        n_mtp = self.config.num_mtp_layers
        if n_mtp == 0:
            raise ValueError("mtp_loss needs a model with num_mtp_layers >= 1 (config.num_mtp_layers == 0)")
        if last_hidden.shape[:-1] != input_ids.shape:
            raise ValueError(f"last_hidden {tuple(last_hidden.shape)} must be input_ids {tuple(input_ids.shape)} + [H]")
        if position_ids is None and cu_seqlens is None:
            t = input_ids.shape[-1]
            position_ids = torch.arange(t, device=input_ids.device).expand_as(input_ids)
        elif position_ids is None:
            _, position_ids, _, _, _ = self._prepare(input_ids, None, cu_seqlens, max_seqlen, None)
            position_ids = position_ids.reshape(input_ids.shape)
        cu = cu_seqlens.to(input_ids.device).long() if cu_seqlens is not None else None
        h = last_hidden
        total = last_hidden.new_zeros((), dtype=torch.float32)
        for k in range(n_mtp):
            nxt, _ = _shift_within_sequences(input_ids, k + 1, position_ids, cu)
            tgt, valid = _shift_within_sequences(input_ids, k + 2, position_ids, cu)
            if loss_mask is not None:
                m, _ = _shift_within_sequences(loss_mask.to(torch.long), k + 2, position_ids, cu)
                valid = valid & m.bool()
            h = self.mtp_hidden(h, nxt, position_ids, cu_seqlens, max_seqlen, layer=k, detach_main=detach_main)
            logits = self.lm_head(h, detach_weight=detach_main).float()
            ce = F.cross_entropy(logits[valid], tgt[valid], reduction="sum") if bool(valid.any()) else logits.sum() * 0
            total = total + ce / valid.sum().clamp(min=1)
        return total * (lam / n_mtp)

    # -------------------------------------------------------------------------------------------- checkpoints
    @torch.no_grad()
    def frozen_copy(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PolicyModel:
        """An independent, inference-only copy (a reference policy, a rollout engine's weights). Built from the
        config and the state dict rather than `copy.deepcopy`, which would also copy whatever a training engine
        attached to this module (DeepSpeed's ZeRO-3 hooks and partition handles). Built on the meta device: no
        random initialisation to throw away (seconds for a 100M-parameter model)."""
        with torch.device("meta"):
            clone = PolicyModel(self.config)
        clone.to_empty(device=self.device)  # uninitialised memory, every tensor of which the state dict fills
        if self.config.tie_word_embeddings:  # to_empty swaps in new parameters one module at a time
            clone.lm_head.weight = clone.model.embed_tokens.weight
        clone.load_state_dict(self.state_dict())
        return clone.to(device=device or self.device, dtype=dtype or self.dtype).eval().requires_grad_(False)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> None:
        """Write a model directory in the source's Hugging Face layout (MTP layers included) with the tokenizer's
        files copied unchanged; see `r1engine.models.checkpoint`."""
        checkpoint.save_pretrained(self, path, tokenizer)

    def export_pretrained(self, path: str | os.PathLike, tokenizer=None, keep_mtp: bool = False) -> None:
        """Write a plain Hugging Face directory of the source architecture (no MTP layers unless `keep_mtp`)."""
        checkpoint.save_pretrained(self, path, tokenizer, keep_mtp=keep_mtp, export=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        num_mtp_layers: int | None = None,
        mtp_init: str = "last_layer",
        seed: int = 0,
    ) -> PolicyModel:
        """Load a Hugging Face model directory of a supported family (Qwen2, Llama, Qwen3, MiMo) or a `.gguf`
        file; `num_mtp_layers` attaches (or drops) MTP layers, new ones initialised by `mtp_init`."""
        return checkpoint.load_pretrained(
            cls, path, dtype=dtype, device=device, num_mtp_layers=num_mtp_layers, mtp_init=mtp_init, seed=seed
        )

    @classmethod
    def from_hf_model(
        cls, hf_model, *, num_mtp_layers: int | None = None, mtp_init: str = "last_layer", seed: int = 0
    ) -> PolicyModel:
        """The policy holding a transformers `*ForCausalLM` of a supported family (its tensors shared, not copied);
        `num_mtp_layers` attaches MTP layers as in `from_pretrained`."""
        return checkpoint.resize_mtp_layers(checkpoint.from_hf_model(cls, hf_model), num_mtp_layers, mtp_init, seed)

    def named_weights(self, include_mtp: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) pairs, tied weights once, in a stable order (weight sync uses this)."""
        seen: set[int] = set()
        for name, p in self.state_dict(keep_vars=False).items():
            if not include_mtp and ".mtp_layers." in f".{name}":
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield name, p

    def num_parameters(self, include_mtp: bool = True) -> int:
        return sum(t.numel() for _, t in self.named_weights(include_mtp))
