"""How a policy is handed to vLLM: as `MiMoForCausalLM` (with MTP speculation) where vLLM's MiMo model can express
it, else as its own architecture without speculation.

vLLM's MiMo model is a Qwen2 body (q/k/v biases, no o_proj bias, head_dim = hidden / heads, optional per-head q/k
RMSNorm through the `qk_norm` config flag) plus `MiMoMTP` as the drafter. A Llama or Qwen3 body fits it when its
head_dim is hidden / heads and it has no o_proj bias: its missing q/k/v biases are sent as zeros, and they stay
zero because the policy has no such parameters to train. Other bodies (Qwen3's usual head_dim of 128 with a
narrower hidden size, attention_bias on o_proj) go to vLLM as LlamaForCausalLM / Qwen3ForCausalLM, which has no MTP
drafter for them: the trainer then speculates with the native engine or not at all, and says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1engine.models.checkpoint import save_pretrained

if TYPE_CHECKING:
    from r1engine.models.config import PolicyConfig
    from r1engine.models.policy import PolicyModel

MIMO = "mimo"
SOURCE = "source"


def mimo_incompatibility(cfg: PolicyConfig) -> str | None:
    """Why vLLM's MiMo model cannot serve `cfg` (None: it can)."""
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        return (
            f"head_dim={cfg.head_dim} differs from hidden_size / num_heads = {cfg.hidden_size // cfg.num_heads} "
            "(vLLM's MiMo/Qwen2 attention derives it)"
        )
    if cfg.o_bias:
        return "the o_proj has a bias (attention_bias), which vLLM's MiMo/Qwen2 attention lacks"
    return None


def unsupported_head_dim(cfg: PolicyConfig) -> str | None:
    """Why vLLM cannot run `cfg`'s attention on this machine (None: it can). Only vLLM's CPU backend restricts the
    head width; it is asked for its list, so a newer vLLM widens it without a change here."""
    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if cfg.head_dim in sizes:
        return None
    return f"vLLM's CPU attention supports head_dim in {sizes}, the model has head_dim={cfg.head_dim}"


def choose_layout(cfg: PolicyConfig) -> str:
    """MIMO when vLLM's MiMo model can serve the body, else SOURCE (the model's own architecture)."""
    return MIMO if mimo_incompatibility(cfg) is None else SOURCE


def config_dict(cfg: PolicyConfig, layout: str) -> dict[str, Any]:
    """The `config.json` vLLM starts from."""
    if layout == SOURCE:
        return cfg.export_hf_dict(keep_mtp=False)
    out = cfg.to_hf_dict()
    if cfg.source_config is None:
        return out  # a preset: already MiMo
    out["architectures"] = ["MiMoForCausalLM"]
    out["model_type"] = "qwen2"
    out["qk_norm"] = cfg.qk_norm
    out["use_sliding_window"] = False
    out.setdefault("max_window_layers", cfg.num_layers)
    return out


def named_weights(model: PolicyModel, layout: str, include_mtp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors vLLM loads for `layout`: the policy's, plus zero q/k/v biases where a MIMO-served body has none."""
    yield from layout_weights(model.named_weights(), model.config, layout, include_mtp)


def layout_weights(
    weights: Iterable[tuple[str, torch.Tensor]], cfg: PolicyConfig, layout: str, include_mtp: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named_weights` for a stream of (policy checkpoint name, tensor) pairs (`PolicyModel.named_weights`): drops
    the MTP layers unless `include_mtp` and `layout` is MIMO, adds the zero q/k/v biases a MIMO-served body lacks."""
    keep_mtp = include_mtp and layout == MIMO
    for name, t in weights:
        if not keep_mtp and ".mtp_layers." in f".{name}":
            continue
        yield name, t
        if layout == MIMO and not cfg.qkv_bias and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            yield name.removesuffix("weight") + "bias", torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)


def write_model_dir(model: PolicyModel, out: str | Path, layout: str) -> Path:
    """A directory vLLM starts from for `layout`: weights, config and generation config. No tokenizer files: the
    engine runs without a tokenizer (token ids in and out), and a chat template there only makes vLLM try one."""
    from safetensors.torch import save_file

    out = Path(out)
    if layout == MIMO and model.config.source_config is None:
        save_pretrained(model, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out, keep_mtp=False, export=True)  # the generation config
    cfg = config_dict(model.config, layout)
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {n: t.detach().cpu().contiguous() for n, t in named_weights(model, layout, include_mtp=True)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
