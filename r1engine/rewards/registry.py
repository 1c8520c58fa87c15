"""The reward-function contract and the by-name registry.

Every reward is a batched callable ``fn(completions, references) -> list[RewardResult]``: one result per
completion, in input order. ``RewardResult.reason`` explains any score that is not a clean pass/fail (a
missing tag, a timeout, a parse error, a sandbox kill), so that training logs say *why* a sample scored 0.

Rewards register themselves with :func:`register_reward`; :func:`get_reward` builds one from a name and
keyword options (the form a config file gives). A name of the form ``"package.module:attribute"`` is
imported instead, so that user-defined rewards also work inside worker processes (see ``scheduler.py``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class RewardResult:
    """One completion's reward: ``score`` and, when it is not a clean pass/fail, a short ``reason``."""

    score: float
    reason: str | None = None


class RewardFn(Protocol):
    """The batched reward contract."""

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]: ...


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Class/factory decorator: make ``factory(**options)`` available as ``get_reward(name, **options)``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"register_reward: name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return deco


def _ensure_builtins() -> None:
    # Importing the package registers the built-in rewards (a worker process may import only this module).
    importlib.import_module("r1engine.rewards")


def available_rewards() -> list[str]:
    """Names accepted by :func:`get_reward` (built-in and registered so far), sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_reward(name: str, **options: Any) -> RewardFn:
    """Build the reward called ``name`` with ``options``; ``"pkg.mod:attr"`` imports a callable/factory.

    For an import path, a class or factory is called with ``options``; a plain function is returned as is
    (``options`` must then be empty).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_reward: name must be a non-empty string, got {name!r}")
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        obj = getattr(importlib.import_module(mod_name), attr)
        if isinstance(obj, type) or options:
            return obj(**options)
        return obj
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"get_reward: unknown reward {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**options)


def accepts_option(name: str, option: str) -> bool:
    """Whether the built-in reward ``name`` takes the constructor option ``option`` (False for unknown names)."""
    _ensure_builtins()
    factory = _REGISTRY.get(name)
    if factory is None:
        return False
    try:
        return option in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def check_batch(name: str, completions: Sequence[str], references: Sequence[Any]) -> None:
    """Raise early when the batch is malformed (lengths differ, a completion is not a string)."""
    if len(completions) != len(references):
        raise ValueError(
            f"{name}: completions and references must have the same length, got {len(completions)} and "
            f"{len(references)}"
        )
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"{name}: completions[{i}] must be a str, got {type(c).__name__}")
