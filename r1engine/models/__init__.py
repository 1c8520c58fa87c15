"""Policy model with MTP layers (MiMo checkpoint layout), its KV cache and a character tokenizer."""

from __future__ import annotations

from r1engine.models.config import PolicyConfig
from r1engine.models.kv_cache import KVCache
from r1engine.models.policy import ModelOutput, PolicyModel
from r1engine.models.tokenizer import TextCodec, build_char_tokenizer

__all__ = ["KVCache", "ModelOutput", "PolicyConfig", "PolicyModel", "TextCodec", "build_char_tokenizer"]
