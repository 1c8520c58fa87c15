"""What the benchmark scripts share: the facts of a results file's header (commit, machine) and a small timer.

Scripts run as `python benchmarks/bench_*.py` put the repository root on `sys.path` and import this module as
`benchmarks.common`.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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
