"""Name tables of interchangeable algorithm pieces (policy losses, KL estimators, advantage estimators).

A config names the piece; the table maps the name to the implementation, and a new piece is one decorated
function, usable everywhere the table is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A ``dict`` of named implementations of one ``kind`` (the name of the setting that picks one)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file the implementation under ``name`` (another object already filed there is an error)."""

        def deco(impl: T) -> T:
            if name in self and self[name] is not impl:
                raise ValueError(f"{self.kind}: {name!r} is already registered to {self[name]!r}")
            self[name] = impl
            return impl

        return deco

    def lookup(self, name: str) -> T:
        """The implementation filed under ``name``; a ValueError naming the setting and the choices otherwise."""
        if name not in self:
            raise ValueError(f"{self.kind}: expected one of {sorted(self)}, got {name!r}")
        return self[name]
