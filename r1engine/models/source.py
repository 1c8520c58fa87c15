"""Where a policy comes from: a Hugging Face model directory (or `.gguf` file) and its tokenizer, checked together
before any weights are read, with errors that name the config key at fault (`model.path`, `model.tokenizer`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1engine.models.config import PolicyConfig


class ModelSourceError(ValueError):
    """A model or tokenizer that cannot serve as the policy; the message starts with the config key."""


@dataclass
class ModelSource:
    """A checked model directory: its config, its tokenizer and the ids generation stops at."""

    path: Path
    config: PolicyConfig
    tokenizer: Any
    stop_ids: list[int]


def check_tokenizer_fits(tokenizer: Any, config: PolicyConfig, key: str) -> None:
    """Raise when the tokenizer cannot be this model's: ids past the embedding, or a vocabulary so much smaller
    than the embedding that it must belong to another model."""
    n, vocab = len(tokenizer), config.vocab_size
    if n > vocab:
        raise ModelSourceError(
            f"{key}: the tokenizer has {n} tokens but the model's embedding has vocab_size={vocab} rows: ids >= "
            f"{vocab} would index past it (is it this model's tokenizer?)"
        )
    if n < vocab // 2:
        raise ModelSourceError(
            f"{key}: the tokenizer has {n} tokens for a model with vocab_size={vocab}: not this model's tokenizer "
            "(a model's vocabulary is its tokenizer's, padded by at most a few hundred rows)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and not 0 <= int(value) < vocab:
            raise ModelSourceError(f"{key}: the tokenizer's {name}={value} lies outside vocab_size={vocab}")


def inspect_source(
    path: str | Path, tokenizer_path: str | Path | None = None, *, key: str = "model.path"
) -> ModelSource:
    """Resolve `path` (converting a `.gguf` file once, cached), read its config and load its tokenizer (or the one
    in `tokenizer_path`); raise ModelSourceError naming `key` (the config key that gave `path`: `model.path` or its
    alias `model.init_from`) or `model.tokenizer` when something is off."""
    from r1engine.models.checkpoint import read_config, resolve_model_dir
    from r1engine.models.tokenizer import load_tokenizer, stop_token_ids

    try:
        root = resolve_model_dir(path, key=key)
        config = read_config(root, key=key)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise ModelSourceError(str(exc)) from exc
    tok_key = "model.tokenizer" if tokenizer_path is not None else key
    try:
        tokenizer = load_tokenizer(Path(tokenizer_path) if tokenizer_path is not None else root, key=tok_key)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelSourceError(str(exc)) from exc
    check_tokenizer_fits(tokenizer, config, tok_key)
    try:
        stops = stop_token_ids(tokenizer, config.generation_config, {"eos_token_id": config.eos_token_id})
    except ValueError as exc:
        raise ModelSourceError(f"{tok_key}: {exc}") from exc
    bad = [i for i in stops if not 0 <= i < config.vocab_size]
    if bad:
        raise ModelSourceError(f"{key}: eos_token_id {bad} lies outside vocab_size={config.vocab_size}")
    return ModelSource(root, config, tokenizer, stops)
