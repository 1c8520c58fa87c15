"""`PolicyConfig`: the hyper-parameters of the MTP-capable policy and their mapping to a MiMo `config.json`.

The checkpoint layout is MiMo's (a Qwen2 body plus `model.mtp_layers.{i}.*`) so that vLLM loads the same directory
as `MiMoForCausalLM` for the main model and as `MiMoMTPModel` for the speculative drafter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class PolicyConfig:
    """Shape of a Qwen2-style decoder with `num_mtp_layers` DeepSeek-V3/MiMo multi-token-prediction modules."""

    vocab_size: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PolicyConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"PolicyConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"PolicyConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"PolicyConfig head_dim ({self.hidden_size // self.num_heads}) must be even for RoPE")
        if self.num_mtp_layers < 0:
            raise ValueError(f"PolicyConfig.num_mtp_layers must be >= 0, got {self.num_mtp_layers}")

    @property
    def head_dim(self) -> int:
        """Per-head width (hidden_size / num_heads), as Qwen2 defines it."""
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, vocab_size: int = 128, **overrides: Any) -> PolicyConfig:
        """About 0.65M parameters (hidden 128, 2 layers + 1 MTP layer): for unit tests, fast on 2 CPU cores."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=384,
            max_position_embeddings=512,
            num_mtp_layers=1,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def demo(cls, vocab_size: int = 128, **overrides: Any) -> PolicyConfig:
        """About 1.3M parameters (hidden 192, 3 layers + 1 MTP layer): the end-to-end demo the trainer runs."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=192,
            num_layers=3,
            num_heads=6,
            num_kv_heads=2,
            intermediate_size=512,
            max_position_embeddings=2048,
            num_mtp_layers=1,
        )
        base.update(overrides)
        return cls(**base)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` vLLM reads for `MiMoForCausalLM` (Qwen2 fields + `num_nextn_predict_layers`)."""
        return {
            "architectures": ["MiMoForCausalLM"],
            # vLLM resolves the architecture from `architectures`; the config class itself is Qwen2's (transformers
            # has no "mimo" type and MiMo's own checkpoints need remote code). For the drafter vLLM rewrites the
            # type to "mimo_mtp" itself (vllm/config/speculative.py).
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_layers,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> PolicyConfig:
        """Inverse of `to_hf_dict` (also reads a MiMo/Qwen2 config written by other tools)."""
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in ("MiMoForCausalLM", "Qwen2ForCausalLM"):
            raise ValueError(f"config.json architectures[0] must be MiMoForCausalLM or Qwen2ForCausalLM, got {arch!r}")
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        out = cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(rope),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            num_mtp_layers=cfg.get("num_nextn_predict_layers", 0),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            initializer_range=cfg.get("initializer_range", 0.02),
            bos_token_id=cfg.get("bos_token_id", 1) or 1,
            eos_token_id=cfg.get("eos_token_id", 2) or 2,
            pad_token_id=cfg.get("pad_token_id", 0) or 0,
        )
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim != out.head_dim:
            raise ValueError(f"config.json head_dim={head_dim} but hidden_size/num_attention_heads={out.head_dim}")
        return out

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
