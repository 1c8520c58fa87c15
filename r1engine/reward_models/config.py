"""The configuration of `r1engine train-rm`: YAML in, dotted `key=value` overrides, errors that name the key (the
same typed loading as the training config, `r1engine.trainer.config`).

The defaults of `training.*` are the R1 paper's for its helpfulness and safety reward models (batch size, learning
rate, a single epoch, the longest sequence).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from r1engine.config_file import ConfigError, load_dataclass

__all__ = ["ConfigError", "RMConfig", "RMDataConfig", "RMModelConfig", "RMTrainingConfig", "load_rm_config"]


@dataclass
class RMModelConfig:
    path: str | None = None
    """Where the reward model starts: a policy directory the engine loads (`*ForCausalLM`, MiMo, `.gguf`: its body and
    a new head) or a `*ForSequenceClassification` directory (trained on further); None: a fresh `model.preset` body
    with the character tokenizer."""
    tokenizer: str | None = None
    """A directory holding the tokenizer when it is not `model.path`'s own."""
    preset: Literal["tiny", "demo"] = "tiny"
    """Size preset of r1engine.models.PolicyConfig (without `model.path`)."""
    num_layers: int | None = None
    """Keep only the first this many decoder layers of `model.path`'s body (a smaller, faster reward model from a
    deep checkpoint); None: all of them."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """How inputs are rendered: the tokenizer's chat template, plain text, or chat when the tokenizer has one."""
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class RMDataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL, JSON, parquet or CSV files (gzipped too) or `save_to_disk` directories: preference pairs (kind
    pairwise) or labelled responses (kind pointwise)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out rows; empty: `data.eval_size` rows of the training files, the same split in every run."""
    eval_size: int = 200
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    response_key: str = "response"
    label_key: str = "label"
    """safe/unsafe, true/false or 1/0 (1: safe)."""
    length_balance: Literal["weight", "drop", "none"] = "weight"
    """Keep "the longer response wins" from explaining the preferences (r1engine/reward_models/data.py): re-weight
    or drop pairs so that, at every size of length difference, chosen responses are as often shorter as longer."""
    summary_only: bool = True
    """Pairwise: train on the text after the reasoning block, as the helpfulness reward shows the model."""


@dataclass
class RMTrainingConfig:
    batch_size: int = 256
    """Pairs (pairwise) or responses (pointwise) per optimizer step."""
    lr: float = 6e-6
    epochs: int = 1
    max_length: int = 8192
    """Longest input in tokens; longer rows are left out of training (counted in the metrics)."""
    micro_batch_tokens: int = 8192
    """At most this many tokens per forward + backward (whole pairs); a batch larger than that accumulates gradients."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps, then constant."""
    eval_every: int = 0
    """Held-out evaluation every this many steps (0: only at the end)."""
    device: str = "auto"
    """"auto": cuda when available, else cpu."""
    num_threads: int = 0
    """CPU threads for PyTorch (0: its default)."""


@dataclass
class RMConfig:
    output_dir: str = "runs/reward_model"
    seed: int = 0
    kind: Literal["pairwise", "pointwise"] = "pairwise"
    """pairwise: a preference model trained with the Bradley-Terry loss (helpfulness); pointwise: a safe/unsafe
    classifier trained with binary cross-entropy (safety)."""
    input: Literal["pair", "single"] | None = None
    """pair: the model reads a prompt and both responses (judged with A/B swapped); single: one response per input.
    None: pair for pairwise, single for pointwise."""
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    training: RMTrainingConfig = field(default_factory=RMTrainingConfig)

    @property
    def input_kind(self) -> str:
        return self.input if self.input is not None else ("pair" if self.kind == "pairwise" else "single")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_rm_config(cfg: RMConfig) -> None:
    """Reject impossible values, naming the key."""
    t, d = cfg.training, cfg.data
    for key in ("training.batch_size", "training.epochs", "training.max_length", "training.micro_batch_tokens"):
        value = getattr(t, key.split(".")[1])
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key in ("seed", "training.warmup_steps", "training.eval_every", "training.num_threads"):
        value = cfg.seed if key == "seed" else getattr(t, key.split(".")[1])
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    for key, value in (("training.lr", t.lr), ("training.max_grad_norm", t.max_grad_norm)):
        if not (value > 0 and (math.isfinite(value) or key == "training.max_grad_norm")):
            raise ConfigError(f"{key}: must be a finite value > 0, got {value}")
    if not (t.weight_decay >= 0 and math.isfinite(t.weight_decay)):
        raise ConfigError(f"training.weight_decay: must be a finite value >= 0, got {t.weight_decay}")
    if cfg.kind == "pointwise" and cfg.input == "pair":
        raise ConfigError("input: a pointwise classifier reads single responses; 'pair' is for kind pairwise")
    if not d.train_files:
        raise ConfigError("data.train_files: no files given (preference pairs or labelled responses)")
    if not d.eval_files and d.eval_size < 1:
        raise ConfigError(f"data.eval_size: must be >= 1 without data.eval_files, got {d.eval_size}")
    if t.device != "auto":
        import torch

        try:
            torch.device(t.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"training.device: not a device name: {t.device!r}") from exc
    if cfg.model.num_layers is not None and (cfg.model.path is None or cfg.model.num_layers < 1):
        why = "must be >= 1" if cfg.model.path is not None else "applies with model.path (the presets set their size)"
        raise ConfigError(f"model.num_layers: {why}, got {cfg.model.num_layers}")
    if cfg.model.path is None and cfg.model.tokenizer is not None:
        raise ConfigError("model.tokenizer: applies with model.path (the presets use the character tokenizer)")
    if cfg.model.path is not None:
        from r1engine.models.checkpoint import resolve_model_dir

        try:
            resolve_model_dir(cfg.model.path, key="model.path")
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def load_rm_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RMConfig:
    """Load a YAML config (or the defaults), apply `key=value` overrides, type-check and validate."""
    cfg = load_dataclass(RMConfig, path, overrides)
    validate_rm_config(cfg)
    return cfg
