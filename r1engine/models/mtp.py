"""Attaching MTP layers to a model that has fewer than wanted (any Hugging Face checkpoint has none).

Two initialisations (`mtp_init`):

- "random": as DeepSeek-V3 trains its MTP modules from scratch: Normal(0, initializer_range) projections, unit norms.
- "last_layer": the block starts as a copy of the main model's last decoder layer with its two residual output
  projections (o_proj, down_proj) zeroed, so that it starts as the identity and learns its update from there;
  `input_proj` passes the normalised hidden state through ([I | 0]) and the final norm is the model's. The drafter
  thus starts out as the main model's own next-token head one position back (a sane guess for the token after next,
  far better than the same block fed the sum of both inputs, whose confident wrong guesses cost 3-5x the
  cross-entropy of a random start on SmolLM2), and every weight it needs to move is already shaped for this
  model's hidden states.

Either way the body is untouched, so the main model's outputs do not change; `benchmarks/bench_mtp_attach.py`
measures the drafts' acceptance after each initialisation and after a warm-up of the MTP layers alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from r1engine.models.policy import PolicyModel

MTP_INITS = ("last_layer", "random")


@torch.no_grad()
def init_mtp_layer(model: PolicyModel, index: int, how: str = "last_layer", seed: int = 0) -> None:
    """Initialise `model.model.mtp_layers[index]` in place (see the module docstring for `how`)."""
    if how not in MTP_INITS:
        raise ValueError(f"model.mtp_init: must be one of {', '.join(MTP_INITS)}, got {how!r}")
    layer = model.model.mtp_layers[index]
    gen = torch.Generator().manual_seed(seed * 1009 + index)
    std = model.config.initializer_range
    for name, p in layer.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    if how == "random":
        return
    last = model.model.layers[-1]
    block = {name: p for name, p in last.named_parameters()}
    for name, p in layer.named_parameters():
        if name in block:
            p.copy_(block[name])
    layer.self_attn.o_proj.weight.zero_()
    layer.mlp.down_proj.weight.zero_()
    if layer.self_attn.o_proj.bias is not None:
        layer.self_attn.o_proj.bias.zero_()
    layer.final_layernorm.weight.copy_(model.model.norm.weight)
    hidden = model.config.hidden_size
    eye = torch.eye(hidden, dtype=layer.input_proj.weight.dtype, device=layer.input_proj.weight.device)
    layer.input_proj.weight.copy_(torch.cat([eye, torch.zeros_like(eye)], dim=1))


def mtp_parameters(model: PolicyModel) -> list[torch.nn.Parameter]:
    """The MTP layers' own parameters (what an MTP warm-up trains; embedding and head are the body's)."""
    return list(model.model.mtp_layers.parameters())
