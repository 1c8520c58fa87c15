"""`PolicyConfig`: the shape of the policy, read from and written back to a Hugging Face `config.json`.

One decoder covers the supported families; they differ only in a few switches:

    family   architectures[0]     q/k/v bias        o_proj bias       q/k RMSNorm   head_dim
    Qwen2    Qwen2ForCausalLM     yes               no                no            hidden / heads
    MiMo     MiMoForCausalLM      yes               no                no            hidden / heads  (+ MTP layers)
    Llama    LlamaForCausalLM     attention_bias    attention_bias    no            head_dim or hidden / heads
    Qwen3    Qwen3ForCausalLM     attention_bias    attention_bias    yes           head_dim

A model read from a Hugging Face directory keeps that directory's `config.json` (`source_config`), so checkpoints
and exports write the source architecture back with every field the engine does not interpret unchanged, plus
`num_nextn_predict_layers` when MTP layers are attached. The built-in presets (`tiny`, `demo`) are MiMo models: a
Qwen2 body plus `model.mtp_layers.{i}.*`, which vLLM serves as `MiMoForCausalLM` with `MiMoMTP` as the drafter.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r1engine.models.rotary import check_rope_scaling, rope_cos_sin, rope_type_of

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "MiMoForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")
MTP_KEY = "num_nextn_predict_layers"  # MiMo's / DeepSeek-V3's name for the number of MTP layers


@dataclass
class PolicyConfig:
    """Shape of the decoder plus `num_mtp_layers` DeepSeek-V3/MiMo multi-token-prediction modules."""

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
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    head_dim: int | None = None
    """Per-head width; None: hidden_size / num_heads (Qwen2). Llama and Qwen3 may set it explicitly."""
    qkv_bias: bool = True
    """Biases on the q/k/v projections (Qwen2, MiMo; `attention_bias` for Llama and Qwen3)."""
    o_bias: bool = False
    """Bias on the output projection (`attention_bias` of Llama and Qwen3)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling as transformers writes it (`rope_type` default, linear, llama3 or yarn, with its parameters)."""
    architecture: str = "MiMoForCausalLM"
    """`architectures[0]` of the source checkpoint: what checkpoints and exports write back."""
    source_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The source `config.json` (None for the built-in presets): written back with only the MTP field changed."""
    generation_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The source `generation_config.json` (stop ids, sampling defaults), written back unchanged."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PolicyConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"PolicyConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"PolicyConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"PolicyConfig.head_dim must be even and > 0 for RoPE, got {self.head_dim}")
        if self.num_mtp_layers < 0:
            raise ValueError(f"PolicyConfig.num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"PolicyConfig.architecture: {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        check_rope_scaling(self.rope_scaling)

    @property
    def family(self) -> str:
        """ "qwen2" (Qwen2 and MiMo), "llama" or "qwen3"."""
        return {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}.get(self.architecture, "qwen2")

    @property
    def stop_token_ids(self) -> list[int]:
        """The config's end-of-sequence ids (an int or a list in config.json)."""
        eos = self.eos_token_id
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

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

    # ------------------------------------------------------------------------------------------- config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of a checkpoint: the source's own (MTP field set) or, for the presets, the MiMo
        config vLLM reads for `MiMoForCausalLM` (Qwen2 fields + `num_nextn_predict_layers`)."""
        if self.source_config is not None:
            out = copy.deepcopy(self.source_config)
            out["architectures"] = [self.architecture]
            out[MTP_KEY] = self.num_mtp_layers
            out["num_hidden_layers"] = self.num_layers  # fewer than the source's after RewardModel.keep_layers
            if isinstance(out.get("layer_types"), list):
                out["layer_types"] = out["layer_types"][: self.num_layers]
            return out
        return {
            "architectures": [self.architecture],
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
            MTP_KEY: self.num_mtp_layers,
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

    def export_hf_dict(self, keep_mtp: bool = False) -> dict[str, Any]:
        """The plain Hugging Face `config.json` of the source architecture (`r1engine export`): without the MTP
        field unless `keep_mtp`."""
        out = self.to_hf_dict()
        if not keep_mtp:
            out.pop(MTP_KEY, None)
            if self.architecture == "MiMoForCausalLM":  # without its MTP layers a MiMo model is a Qwen2 model
                out["architectures"] = ["Qwen2ForCausalLM"]
        return out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> PolicyConfig:
        """Read a `config.json` of a supported family; unsupported features raise a ValueError naming the key."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architectures[0]: {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if cfg.get(k) is None]  # fmt: skip
        if missing:
            raise ValueError(f"{missing[0]}: missing from config.json (a {arch} config needs it)")
        _check_supported_features(cfg, arch)
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope_params if rope_type_of(rope_params) != "default" else None)
        theta = cfg.get("rope_theta") or rope_params.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if rope_type_of(scaling) == "default":
                scaling = None
        family_bias = arch in ("LlamaForCausalLM", "Qwen3ForCausalLM")
        attention_bias = bool(cfg.get("attention_bias", False))
        is_preset = arch == "MiMoForCausalLM" and cfg.get("model_type") == "qwen2"  # written by `to_hf_dict`
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if (
            arch in ("Qwen2ForCausalLM", "MiMoForCausalLM")
            and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]
        ):
            raise ValueError(
                f"head_dim: {arch} uses hidden_size / num_attention_heads = "
                f"{cfg['hidden_size'] // cfg['num_attention_heads']}, got head_dim={cfg.get('head_dim')}"
            )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            num_mtp_layers=int(cfg.get(MTP_KEY, 0) or 0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            initializer_range=cfg.get("initializer_range", 0.02),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            head_dim=head_dim,
            qkv_bias=attention_bias if family_bias else True,
            o_bias=attention_bias if family_bias else False,
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=scaling,
            architecture=arch,
            source_config=None if is_preset else copy.deepcopy(cfg),
        )

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin float32 `[..., head_dim]` of this model's rotary embedding (scaling included) at integer
        `positions`: the tables of the eager forward's layers and of the fused decode step, bit for bit."""
        return rope_cos_sin(positions, self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings)


def _check_supported_features(cfg: dict[str, Any], arch: str) -> None:
    """Reject what the engine's decoder does not compute, naming the config key."""
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"hidden_act: only 'silu' (SwiGLU MLP) is supported, got {act!r}")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias: MLP projections with biases are not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported (set it false)")
    layer_types = cfg.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types: only 'full_attention' layers are supported, got {other}")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor: only 1.0 (rotate the whole head) is supported")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    check_rope_scaling(rope)
    if arch == "Qwen2ForCausalLM" and cfg.get("qk_norm"):
        raise ValueError("qk_norm: a Qwen2ForCausalLM with q/k norms is not supported (use Qwen3ForCausalLM)")
