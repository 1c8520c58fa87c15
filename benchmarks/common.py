"""What the benchmark scripts share: the facts of a results file's header (commit, machine), a small timer and the
peak-memory measurement (CUDA allocator peak, or peak RSS on CPU).

Scripts run as `python benchmarks/bench_*.py` put the repository root on `sys.path` and import this module as
`benchmarks.common`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short hash of HEAD ("unknown" outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """`<cpu>, <n> cores, torch <version>` for a results header."""
    import torch

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def time_per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of `fn` over `calls` calls, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def proc_status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (VmRSS, VmHWM, ...); None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak memory of a region: above what was allocated when it began (`extra`) and in all (`total`), bytes."""

    extra: int | None = None
    total: int | None = None


@contextlib.contextmanager
def peak_memory(device: Any) -> Iterator[PeakMemory]:
    """CUDA: the caching allocator's peak. CPU: peak RSS (VmHWM after resetting it via /proc/self/clear_refs)."""
    import torch

    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.total = torch.cuda.max_memory_allocated(device)
        result.extra = result.total - before
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
        before = proc_status_kib("VmRSS")
    except OSError:
        before = None
    yield result
    peak = proc_status_kib("VmHWM")
    if before is not None and peak is not None:
        result.total, result.extra = peak * 1024, max(0, peak - before) * 1024


def precise_cpu_rss() -> None:
    """Map every allocation over 1 MiB on its own (glibc's M_MMAP_THRESHOLD), so that freeing a tensor returns its
    pages and peak RSS follows live tensors instead of the allocator's cache. Script runs only (it changes the
    allocator of the whole process)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def write_report(text: str, result: Any, out: Path | None, json_out: Path | None) -> None:
    """Print a benchmark's markdown report and write it (``out``) and its raw results (``json_out``) when asked."""
    import json

    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
