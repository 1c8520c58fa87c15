"""Registering r1engine's Python operators with `torch.library`, without loading the compiler on eager calls.

`custom_op(qualname, mutates_args=...)` is a drop-in for the subset of `torch.library.custom_op` the fused ops use
(decorate the implementation, then `.register_fake` and `.register_autograd`). It builds the operator from the
lower-level pieces that `torch.library.custom_op` itself is made of: `Library.define` with the schema inferred from
the type hints, the implementation as the `CompositeExplicitAutograd` kernel, `torch.library.register_fake` and
`torch.library.register_autograd`. The operator is the same to the dispatcher, to autograd and to `torch.compile`
(which traces it through the fake kernel).

Why not `torch.library.custom_op` itself: it wraps every implementation in `torch._disable_dynamo`, which imports
`torch._dynamo` (and with it sympy, the inductor configuration and Triton's frontend) on the first eager call of any
custom operator: 144 MiB of resident memory in a process that never compiles anything
(benchmarks/results/optim.md). Here an eager call goes straight from the dispatcher to the Python kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

_NAMESPACE = "r1engine"
# FRAGMENT: the C++ extension defines operators of the same namespace (TORCH_LIBRARY_FRAGMENT in csrc/torch).
_LIB = torch.library.Library(_NAMESPACE, "FRAGMENT")


class CustomOp:
    """One operator `r1engine::<name>`; calling it dispatches through `torch.ops`."""

    def __init__(self, qualname: str, fn: Callable[..., Any], mutates_args: Iterable[str]) -> None:
        namespace, _, name = qualname.partition("::")
        if namespace != _NAMESPACE or not name:
            raise ValueError(f"qualname: expected '{_NAMESPACE}::<name>', got {qualname!r}")
        schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
        _LIB.define(name + schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self.qualname = qualname
        self._op = getattr(getattr(torch.ops, namespace), name).default
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._op(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)


def custom_op(qualname: str, *, mutates_args: Iterable[str]) -> Callable[[Callable[..., Any]], CustomOp]:
    """Decorator: define `qualname` (`"r1engine::<name>"`) with the decorated function as its implementation."""

    def define(fn: Callable[..., Any]) -> CustomOp:
        return CustomOp(qualname, fn, mutates_args)

    return define
