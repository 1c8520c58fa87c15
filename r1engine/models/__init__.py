"""The policy model (Qwen2 / Llama / Qwen3 / MiMo decoders read from Hugging Face directories, with MTP layers), its
config and KV cache, the tokenizer seam (the model's own tokenizer; a character tokenizer for the built-in tasks)."""

from __future__ import annotations

from r1engine.models.config import PolicyConfig
from r1engine.models.kv_cache import KVCache
from r1engine.models.policy import ModelOutput, PolicyModel
from r1engine.models.tokenizer import TextCodec, build_char_tokenizer

__all__ = ["KVCache", "ModelOutput", "PolicyConfig", "PolicyModel", "TextCodec", "build_char_tokenizer"]
