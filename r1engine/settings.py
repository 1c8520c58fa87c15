"""Switches of the engine's fast paths in the models: one documented, immutable settings object.

The policy model and its decoding take their fast paths by default. Benchmarks and tests switch them off to compare
against the plain PyTorch paths (the results must agree), through ``override``::

    from r1engine import settings

    with settings.override(fused_layer_ops=False):
        reference = model(ids)              # layers on the op-by-op PyTorch formulas

``current()`` is the ``Settings`` in effect. An override applies to the code that runs inside its ``with`` block in
this thread (or asyncio task): the settings live in a ``contextvars.ContextVar``, so other threads keep theirs and
nothing is left switched off when the block exits, even by an exception. Code that reads them:
``r1engine.models.layers`` (``fused_layer_ops``, ``attention_backend``), ``r1engine.models.decode_step``
(``fused_decode_step``) and ``r1engine.models.kv_cache`` (``decode_attention_kernel``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["Settings", "current", "override"]


@dataclass(frozen=True)
class Settings:
    """The switches (all on, "auto" for the backend: the fast paths).

    fused_layer_ops: the policy's layers call the fused operators ``r1engine.ops.rms_norm``, ``swiglu`` and ``rope``
        (backend "auto"); False: the op-by-op PyTorch references (the same math; ``benchmarks/bench_layers.py``).
    fused_decode_step: decoding with a KV cache runs in one C++ call where it applies
        (``r1engine.models.decode_step``: ``FusedDecodeStep.build`` and ``decoder_layers_apply``); False: the eager
        forward, module by module.
    decode_attention_kernel: one-query steps of ``KVCache.attend`` on the CPU go through the C++ decode-attention
        kernel; False: SDPA with a ragged mask (``benchmarks/bench_decode_attention.py``). The fused decode step
        needs it (and ``fused_layer_ops``), since it must equal the eager path it replaces.
    attention_backend: the ``backend`` of ``r1engine.packing.attention.varlen_attention`` that the policy's packed
        forwards use ("auto", or one of its ``BACKENDS``; ``benchmarks/bench_attention.py`` pins one).
    """

    fused_layer_ops: bool = True
    fused_decode_step: bool = True
    decode_attention_kernel: bool = True
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = bool if f.type in ("bool", bool) else str
            if type(value) is not want:
                raise TypeError(f"settings.{f.name}: expected a {want.__name__}, got {value!r}")


_CURRENT: ContextVar[Settings] = ContextVar("r1engine_settings", default=Settings())  # noqa: B039  (frozen)


def current() -> Settings:
    """The settings in effect here (the defaults outside any ``override``)."""
    return _CURRENT.get()


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Within the block, the current settings with ``changes`` (field names of ``Settings``); yields them."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        names = ", ".join(f.name for f in dataclasses.fields(Settings))
        raise TypeError(f"settings: unknown setting(s) {', '.join(unknown)}; expected some of {names}")
    new = dataclasses.replace(current(), **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)
