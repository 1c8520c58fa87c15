"""One registry of the backends of every r1engine op that has a ``backend=`` switch.

An op registers its backends once, when its module is imported (``register``): the concrete backends in the order
in which "auto" prefers them, each with the device types and dtypes for which "auto" may pick it and a check that
says why it cannot run on this machine. Every op then

- validates its ``backend=`` argument the same way (``OpBackends.validate``): a ValueError
  ``backend: expected one of ('auto', 'cpp', 'torch') for rms_norm, got 'jax'``;
- resolves "auto" by one rule (``OpBackends.resolve``): the first backend that "auto" may pick for the input's device
  and dtype and whose check passes (every op has a pure-PyTorch or pure-Python backend that always can run);
- says once why a faster backend was not picked (``report``): logger ``r1engine.ops.backends``, once per op, backend
  and reason. INFO when the backend is simply not there (the package is not installed, the extension was not
  built, or built without CUDA); WARNING when it is there but broken (an ImportError raised from inside the kernel
  module or a dependency's submodule, an extension that fails to load or lacks the operator). Broken backends are
  also recorded (``broken()``), and the test suite fails a test during which one turns up (tests/conftest.py).

Kernel modules are imported with ``except ImportError`` only: any other exception raised while importing one (a
SyntaxError, a RuntimeError in a kernel's decoration) propagates to the caller instead of hiding behind the slow path.

The ops and their backends (``registered()``; ``python -m r1engine.info`` prints them with what "auto" picks here):

======================  =====================================================================================
op                      backends, in "auto"'s order of preference
======================  =====================================================================================
grpo_loss               cuda, triton (CUDA tensors), cpp (CPU tensors), torch  (``r1engine.ops.backends``)
linear_grpo_loss        triton (CUDA tensors), torch  (``r1engine.ops.backends``)
rms_norm, swiglu, rope  cpp (fp32/bf16 CPU tensors), torch
varlen_attention        flash (CUDA tensors), cpu (fp32/bf16 CPU tensors; alias cpp), sdpa_bucket; never by
                        "auto": sdpa_loop, sdpa_mask, reference  (``r1engine.packing.attention``)
packing_plan            cpp, python  (``r1engine.packing.planner``)
fused_adamw             cpp, torch  (``r1engine.optim``; which tensors qualify is decided per tensor)
======================  =====================================================================================

The names mean the same in every op: ``torch`` is the PyTorch formulas (the oracle in tests), ``cpp`` a C++ CPU
kernel of the compiled extension (varlen attention's historical ``cpu`` is the same), ``cuda`` a CUDA kernel of the
extension, ``triton`` a Triton kernel (``r1engine.kernels``); the others are particular to their op.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from r1engine import _ext

__all__ = [
    "Backend",
    "OpBackends",
    "Unavailable",
    "broken",
    "compiled_op",
    "get",
    "importable",
    "register",
    "registered",
    "report",
    "reset",
]

log = logging.getLogger("r1engine.ops.backends")


@dataclass(frozen=True)
class Unavailable:
    """Why a backend cannot run here. ``broken``: it is installed or built but fails (a WARNING, and a failed test in
    the test suite); otherwise it is simply not there (not installed, not built, not built with CUDA): INFO."""

    reason: str
    broken: bool = False


Check = Callable[[], Unavailable | None]


@dataclass(frozen=True)
class Backend:
    """One backend of an op.

    ``auto``: whether "auto" may pick it at all; ``auto_devices`` / ``auto_dtypes``: the device types and dtypes for
    which it may (None: any; a resolution without a device or dtype skips that test). ``check``: why it cannot run
    here, or None when it can (None: it always can). ``aliases``: other names accepted for it.
    """

    name: str
    summary: str
    auto: bool = True
    auto_devices: tuple[str, ...] | None = None
    auto_dtypes: tuple[torch.dtype, ...] | None = None
    check: Check | None = None
    aliases: tuple[str, ...] = ()

    def fits(self, device: torch.device | None, dtype: torch.dtype | None) -> bool:
        """Whether "auto" may pick this backend for tensors on ``device`` of ``dtype``."""
        if not self.auto:
            return False
        if device is not None and self.auto_devices is not None and device.type not in self.auto_devices:
            return False
        return dtype is None or self.auto_dtypes is None or dtype in self.auto_dtypes

    def unavailable(self) -> Unavailable | None:
        """Why this backend cannot run here (None: it can)."""
        return None if self.check is None else self.check()


class OpBackends:
    """The backends of one op (see the module docstring); ``names`` is what its ``backend=`` accepts, "auto" first
    (aliases are accepted too)."""

    def __init__(self, op: str, backends: Sequence[Backend]) -> None:
        if not any(b.auto and b.check is None and b.auto_devices is None and b.auto_dtypes is None for b in backends):
            raise ValueError(f"{op}: needs a backend that 'auto' can always pick (any device and dtype, no check)")
        self.op = op
        self.backends = tuple(backends)
        self.names = ("auto", *(b.name for b in self.backends))
        self._by_name = {b.name: b for b in self.backends} | {a: b for b in self.backends for a in b.aliases}

    def __repr__(self) -> str:
        return f"OpBackends({self.op!r}, {self.names})"

    def validate(self, backend: str) -> str:
        """The canonical name of ``backend`` ("auto" or a concrete backend); a ValueError naming the op, the value
        and the choices when it is none of them."""
        if backend == "auto":
            return "auto"
        found = self._by_name.get(backend) if isinstance(backend, str) else None
        if found is None:
            raise ValueError(f"backend: expected one of {self.names} for {self.op}, got {backend!r}")
        return found.name

    def backend(self, name: str) -> Backend:
        """The registered backend called ``name`` (or one of its aliases)."""
        return self._by_name[self.validate(name)]

    def resolve(self, backend: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
        """The concrete backend for ``backend`` on tensors on ``device`` of ``dtype``: itself unless it is "auto"
        (availability of a named backend is the op's to check, with its own message); for "auto" the first backend
        that fits and is available, after reporting once why each faster one that fits was passed over."""
        name = self.validate(backend)
        if name != "auto":
            return name
        skipped = None
        for b in self.backends:
            if not b.fits(device, dtype):
                continue
            why = b.unavailable()
            if why is None:
                if skipped:
                    for other, reason in skipped:
                        report(self.op, other, reason, using=b.name)
                return b.name
            skipped = [*(skipped or ()), (b.name, why)]
        raise RuntimeError(f"{self.op}: no backend fits device {device} and dtype {dtype}: {self.names}")

    def require(self, name: str) -> None:
        """Raise a RuntimeError naming the op, the backend and why when backend ``name`` cannot run here."""
        why = self.backend(name).unavailable()
        if why is not None:
            raise RuntimeError(f"{self.op}: backend={name!r} is unavailable here: {why.reason}")


_OPS: dict[str, OpBackends] = {}


def register(op: str, backends: Sequence[Backend]) -> OpBackends:
    """Register (or, on a module reload, replace) the backends of ``op``; returns them."""
    entry = OpBackends(op, backends)
    _OPS[op] = entry
    return entry


def get(op: str) -> OpBackends:
    """The registered backends of ``op`` (its module must have been imported)."""
    try:
        return _OPS[op]
    except KeyError:
        raise KeyError(f"op: no backends registered for {op!r}; registered: {sorted(_OPS)}") from None


def registered() -> dict[str, OpBackends]:
    """Every registered op (those whose modules are imported), by name."""
    return dict(_OPS)


# ---------------------------------------------------------------------------------------------------- reporting
_REPORTED: set[tuple[str, str, str]] = set()
_BROKEN: list[tuple[str, str, str]] = []


def report(op: str, backend: str, why: Unavailable, *, using: str) -> None:
    """Log once per (op, backend, reason) that ``backend`` of ``op`` was passed over for ``using`` and why (see the
    module docstring for the levels); broken backends are also recorded for ``broken()``."""
    key = (op, backend, why.reason)
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    if why.broken:
        _BROKEN.append(key)
    level = logging.WARNING if why.broken else logging.INFO
    log.log(level, "%s: backend %r unavailable, using %r: %s", op, backend, using, why.reason)


def broken() -> list[tuple[str, str, str]]:
    """(op, backend, reason) of every broken backend reported so far in this process, in order."""
    return list(_BROKEN)


def reset() -> None:
    """Forget what was reported and the cached import checks (tests)."""
    _REPORTED.clear()
    _BROKEN.clear()
    for check in _IMPORT_CHECKS:
        check.cache_clear()


# ---------------------------------------------------------------------------------------------------- checks
def compiled_op(op_name: str, *, cuda: bool = False) -> Check:
    """Check: the compiled extension has ``torch.ops.r1engine.<op_name>`` (and, with ``cuda``, was built with CUDA)."""

    def check() -> Unavailable | None:
        if not _ext.available():
            state = "fails to load" if _ext.built() else "is not built"
            return Unavailable(f"r1engine's compiled extension {state} ({_ext.load_error()})", broken=_ext.built())
        if not hasattr(torch.ops.r1engine, op_name):
            return Unavailable(
                f"r1engine's compiled extension has no operator '{op_name}' (built from older sources: rebuild it)",
                broken=True,
            )
        if cuda and not _ext.cuda_compiled():
            return Unavailable("r1engine's compiled extension was built without CUDA (no CUDA toolkit at build time)")
        return None

    return check


_IMPORT_CHECKS: list = []


def importable(module: str, *, optional: tuple[str, ...], attr: str | None = None) -> Check:
    """Check: ``module`` imports (and has ``attr``). Tried once per process (``reset`` forgets it). A
    ModuleNotFoundError for one of the ``optional`` packages themselves means "not installed"; any other
    ImportError, or a missing ``attr``, means broken. Exceptions other than ImportError propagate."""

    @functools.cache
    def check() -> Unavailable | None:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name in optional
            what = "is not installed" if missing else "failed to import"
            return Unavailable(f"{exc.name if missing else module} {what} ({type(exc).__name__}: {exc})", not missing)
        if attr is not None and not hasattr(mod, attr):
            return Unavailable(f"{module} has no attribute {attr!r} (an unsupported version?)", broken=True)
        return None

    _IMPORT_CHECKS.append(check)
    return check
