"""Model directories: Hugging Face layout in (Qwen2, Llama, Qwen3, MiMo; safetensors, sharded or not, or
`pytorch_model*.bin`; a `.gguf` file through `r1engine.models.gguf`), the same layout out.

A checkpoint written here is the source's `config.json` (plus `num_nextn_predict_layers` when MTP layers are
attached), `generation_config.json`, `model.safetensors` with the Hugging Face names (`model.layers.*`,
`model.mtp_layers.{i}.*`, `lm_head.weight` unless tied) and the tokenizer's files copied byte for byte from the
directory it was loaded from (or saved with `save_pretrained` for a tokenizer built in memory). Such a directory
loads here, in transformers (which ignores the MTP tensors) and, for the MiMo layout, in vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1engine.models.config import PolicyConfig
from r1engine.models.layers import MTPLayer
from r1engine.models.mtp import init_mtp_layer
from r1engine.models.tokenizer import TOKENIZER_FILES, check_vocab_fits

if TYPE_CHECKING:
    from r1engine.models.policy import PolicyModel

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are recomputed here (RoPE tables of older transformers versions).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    """The model directory `path` names: the directory itself, or the safetensors cache of a `.gguf` file.
    Raises a FileNotFoundError naming `key` when it is neither."""
    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".gguf":
        from r1engine.models.gguf import cached_gguf_dir

        return cached_gguf_dir(root)
    if not root.exists():
        raise FileNotFoundError(f"{key}: {str(root)!r} does not exist")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {str(root)!r} is not a model directory (no config.json; or a .gguf file)")
    return root


def read_config(root: Path, key: str = "model.path") -> PolicyConfig:
    """The `PolicyConfig` of a model directory; a bad or unsupported config raises a ValueError naming the key."""
    try:
        raw = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key}: {root}/config.json is not valid JSON ({exc})") from exc
    try:
        config = PolicyConfig.from_hf_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{key}: {root}/config.json: {exc}") from exc
    gen = root / "generation_config.json"
    if gen.is_file():
        config.generation_config = json.loads(gen.read_text())
    return config


def load_state(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: `*.safetensors` (sharded or not) or `pytorch_model*.bin`."""
    from safetensors.torch import load_file

    files = sorted(root.glob("*.safetensors"))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if not files:
        bins = sorted(root.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights under {root}")
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def load_pretrained(
    cls: type[PolicyModel],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    num_mtp_layers: int | None = None,
    mtp_init: str = "last_layer",
    seed: int = 0,
) -> PolicyModel:
    """Build the policy of a model directory (or `.gguf` file) and load every tensor strictly.

    `num_mtp_layers` (None: as the checkpoint has) attaches new MTP layers initialised by `mtp_init`
    (`r1engine.models.mtp`) or drops surplus ones. Missing or unexpected tensors raise, naming them.
    """
    root = resolve_model_dir(path)
    model = from_state(cls, read_config(root), load_state(root), where=str(root))
    return resize_mtp_layers(model, num_mtp_layers, mtp_init, seed).to(device=device, dtype=dtype)


def from_state(cls: type[PolicyModel], config: PolicyConfig, state: dict[str, torch.Tensor], where: str) -> PolicyModel:
    """The policy of `config` holding the tensors of `state` (Hugging Face names), built on the meta device so no
    memory is spent on an initialisation that would be overwritten; tied heads stay tied."""
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} does not match its config.json: missing tensors {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    return model


def from_hf_model(cls: type[PolicyModel], hf_model: Any) -> PolicyModel:
    """The policy holding a transformers model's weights (a copy of its config, its tensors shared)."""
    raw = hf_model.config.to_dict()
    raw["architectures"] = [type(hf_model).__name__]  # a model built from a config alone has none recorded
    config = PolicyConfig.from_hf_dict(raw)
    gen = getattr(hf_model, "generation_config", None)
    if gen is not None:
        config.generation_config = gen.to_diff_dict()
    state = {k: v.detach() for k, v in hf_model.state_dict().items() if not k.endswith(_IGNORED_SUFFIXES)}
    return from_state(cls, config, state, where=type(hf_model).__name__)


def resize_mtp_layers(model: PolicyModel, num_mtp_layers: int | None, how: str = "last_layer", seed: int = 0):
    """`model` with `num_mtp_layers` MTP layers (None: unchanged): surplus ones dropped, new ones appended and
    initialised by `how` (`r1engine.models.mtp`). The main model is untouched; returns `model`."""
    have = model.config.num_mtp_layers
    want = have if num_mtp_layers is None else int(num_mtp_layers)
    if want < 0:
        raise ValueError(f"model.mtp_layers: must be >= 0, got {want}")
    if want == have:
        return model
    model.config = model.config.replace(num_mtp_layers=want)
    layers = model.model.mtp_layers
    if want < have:
        del layers[want:]
        log.info("dropped %d MTP layer(s) (model.mtp_layers=%d)", have - want, want)
        return model
    reference = model.model.embed_tokens.weight
    for i in range(have, want):
        layers.append(MTPLayer(model.config).to(device=reference.device, dtype=reference.dtype))
        init_mtp_layer(model, i, how, seed)
    log.info("attached %d new MTP layer(s), initialised %r", want - have, how)
    return model


def save_pretrained(
    model: PolicyModel, path: str | os.PathLike, tokenizer: Any = None, *, keep_mtp: bool = True, export: bool = False
) -> None:
    """Write a model directory (see the module docstring). `export=True` writes the plain Hugging Face directory
    of the source architecture (`r1engine export`): no MTP tensors or field unless `keep_mtp`."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        check_vocab_fits(tokenizer, model.config.vocab_size)
    cfg = model.config.export_hf_dict(keep_mtp) if export else model.config.to_hf_dict()
    dtype_name = str(model.dtype).removeprefix("torch.")
    cfg["torch_dtype" if "dtype" not in cfg else "dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = model.config.generation_config
    if gen is None:
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in model.named_weights(include_mtp=keep_mtp or not export)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """The tokenizer's files into `out`: copied byte for byte from the directory it was loaded from when there is
    one (so checkpoints keep the source tokenizer unchanged), else `save_pretrained`."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()] if source.is_dir() else []
    if files and source.resolve() != out.resolve():
        for f in files:
            shutil.copyfile(f, out / f.name)
    elif not files:
        tokenizer.save_pretrained(str(out))
