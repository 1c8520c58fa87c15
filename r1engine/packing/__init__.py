"""Sequence packing for training: the best-fit planner, collate/uncollate of packed batches, packed attention."""

from __future__ import annotations

from r1engine.packing.attention import varlen_attention, varlen_attention_reference
from r1engine.packing.collate import PackedBatch, collate, uncollate
from r1engine.packing.planner import (
    DEFAULT_ATTN_COEF,
    PackedChunk,
    PackingPlan,
    best_fit_decreasing_reference,
    plan,
)

__all__ = [
    "DEFAULT_ATTN_COEF",
    "PackedBatch",
    "PackedChunk",
    "PackingPlan",
    "best_fit_decreasing_reference",
    "collate",
    "plan",
    "uncollate",
    "varlen_attention",
    "varlen_attention_reference",
]
