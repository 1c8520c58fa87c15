"""MiMo-layout model directories: `config.json` + `model.safetensors` (+ tokenizer), read by vLLM and by us."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from r1engine.models.config import PolicyConfig
from r1engine.models.tokenizer import check_vocab_fits

if TYPE_CHECKING:
    from r1engine.models.policy import PolicyModel


def save_pretrained(model: PolicyModel, path: str | os.PathLike, tokenizer=None) -> None:
    """Write config.json (MiMoForCausalLM), model.safetensors (names `model.layers.*`, `model.mtp_layers.{i}.*`,
    `lm_head.weight`), generation_config.json and the tokenizer's files when one is given."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        check_vocab_fits(tokenizer, model.config.vocab_size)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.named_weights()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def load_pretrained(cls: type[PolicyModel], path: str | os.PathLike, *, dtype: torch.dtype, device: str) -> PolicyModel:
    """Build the model from config.json and load every tensor strictly (missing/unexpected names raise)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}/config.json not found: not a model directory")
    config = PolicyConfig.from_hf_dict(json.loads((root / "config.json").read_text()))
    model = cls(config)
    state: dict[str, torch.Tensor] = {}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {root}")
    for f in files:
        state.update(load_file(str(f)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root} does not match its config: missing={missing} unexpected={unexpected}")
    return model.to(device=device, dtype=dtype)
