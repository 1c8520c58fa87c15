"""A killable helper process for work that may hang or explode inside C code (SymPy on ``2**2**2**100``).

``signal.SIGALRM`` timeouts (math-verify's own) cannot interrupt a long C-level bignum power and do not
work off the main thread; the robust answer is a separate process that the caller kills when it runs
past its deadline. :class:`KillableWorker` keeps one such process warm (imports paid once), sends it one
call at a time over a pipe (length-prefixed pickles on the child's stdin/stdout), and on a timeout or a
crash kills it (SIGKILL to its process group) and starts a fresh one lazily on the next call. The child
runs under ``RLIMIT_AS`` so a memory blow-up ends as ``MemoryError`` (or a kill) instead of swapping.

It is started with ``subprocess`` (not ``multiprocessing``), so it also works from daemonic worker
processes such as the reward scheduler's.
"""

from __future__ import annotations

import importlib
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

_HEADER = struct.Struct("<Q")
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies (so helpers never outlive a
    killed reward worker). Best effort; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class WorkerTimeout(Exception):
    """The call ran past its deadline; the worker was killed."""


class WorkerCrashed(Exception):
    """The worker process died (killed by a limit, segfault, ...) during the call."""


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise WorkerTimeout()
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise WorkerCrashed()
        buf += chunk
    return bytes(buf)


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class KillableWorker:
    """Run ``module:function`` calls in a helper process with a per-call timeout.

    Args:
        target: ``"package.module:function"``; called as ``function(*args)`` in the child.
        memory_limit_bytes: ``RLIMIT_AS`` of the child (None: unlimited).
        start_timeout_s: how long the child may take to import ``target``'s module.
    """

    def __init__(self, target: str, memory_limit_bytes: int | None = 3 << 30, start_timeout_s: float = 120.0):
        if ":" not in target:
            raise ValueError(f"KillableWorker: target must be 'module:function', got {target!r}")
        self.target = target
        self.memory_limit_bytes = memory_limit_bytes
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one call at a time on the pipe
        self.restarts = 0

    def _start(self) -> None:
        limit = self.memory_limit_bytes

        def preexec() -> None:
            os.setsid()
            set_pdeathsig()
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from r1engine.rewards.isolated import _serve; _serve()", self.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=preexec,
            env=env,
        )
        try:
            ready = self._recv(time.monotonic() + self.start_timeout_s)
        except (WorkerTimeout, WorkerCrashed):
            self.kill()
            raise RuntimeError(f"KillableWorker: helper process for {self.target} failed to start") from None
        if ready != ("ready", None):
            self.kill()
            raise RuntimeError(f"KillableWorker: helper for {self.target} failed to import: {ready!r}")

    def _recv(self, deadline: float | None) -> Any:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
        return pickle.loads(_read_exact(fd, n, deadline))

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        """Run ``target(*args)`` in the helper; raise WorkerTimeout/WorkerCrashed (helper replaced next call),
        or RuntimeError carrying the child's exception text. Thread-safe (calls are serialised)."""
        with self._lock:
            return self._call(args, timeout)

    def _call(self, args: tuple, timeout: float | None) -> Any:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            _write_frame(self._proc.stdin.fileno(), args)
            status, value = self._recv(None if timeout is None else time.monotonic() + timeout)
        except (WorkerTimeout, WorkerCrashed, BrokenPipeError):
            crashed = self._proc.poll() is not None
            self.kill()
            self.restarts += 1
            if crashed:
                raise WorkerCrashed() from None
            raise WorkerTimeout() from None
        if status == "ok":
            return value
        if status == "memory":
            raise MemoryError(value)
        raise RuntimeError(value)

    def kill(self) -> None:
        """Kill the helper (and anything it started) now."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    close = kill

    def __getstate__(self) -> dict:
        # Pickles as its configuration only: the copy starts its own helper on first use.
        return {"target": self.target, "memory_limit_bytes": self.memory_limit_bytes, "start": self.start_timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["target"], state["memory_limit_bytes"], state["start"])

    def __del__(self) -> None:
        try:
            self.kill()
        except Exception:
            pass


def _serve() -> None:
    """Child side: import the target, then answer calls until stdin closes."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from the target must not corrupt the channel
    in_fd = sys.stdin.fileno()
    try:
        mod, _, attr = sys.argv[1].partition(":")
        fn = getattr(importlib.import_module(mod), attr)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        _write_frame(out_fd, ("error", f"{type(e).__name__}: {e}"))
        return
    _write_frame(out_fd, ("ready", None))
    while True:
        try:
            (n,) = _HEADER.unpack(_read_exact(in_fd, _HEADER.size, None))
            args = pickle.loads(_read_exact(in_fd, n, None))
        except WorkerCrashed:
            return
        try:
            reply = ("ok", fn(*args))
        except MemoryError:
            reply = ("memory", "killed: memory limit")
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            reply = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        _write_frame(out_fd, reply)
