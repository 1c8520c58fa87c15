"""Atomic training checkpoints: a crash at any point leaves either the previous checkpoint or the new one.

Layout under `<output_dir>/checkpoints/`:
    step-000040/           model/ (safetensors + config + tokenizer, loadable by vLLM), trainer.pt, and what each
                           rank writes (DeepSpeed's partitioned optimizer state, per-rank RNG states)
    latest                 the name of the newest complete checkpoint (replaced atomically)
A checkpoint is written into `step-XXXXXX.tmp`, flushed to disk, renamed into place, and only then is
`latest` switched to it; unreferenced or half-written directories are ignored and cleaned up. On several ranks,
rank 0 owns the directory and the renames, and barriers order them around every rank's writes.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1engine.trainer.distributed import barrier


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def writable_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """`path` created if needed and checked writable; otherwise a ConfigError naming `key`, the path and why."""
    from r1engine.trainer.config import ConfigError

    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        blocker = next((p for p in (out, *out.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{str(blocker)!r} is a file, not a directory"
        else:
            why = exc.strerror or str(exc)
        raise ConfigError(f"{key}: cannot write to {str(out)!r}: {why}") from None
    return out


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep: int = 2, rank: int = 0):
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer.pt").is_file() else None

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict[str, Any] | None) -> Path:
        """Write checkpoint `step`. Every rank calls this: `write(directory)` runs on every rank (collective writers
        such as DeepSpeed's sharded checkpoint, per-rank files); rank 0 pickles `trainer_state` (other ranks may
        pass None) and publishes the checkpoint."""
        main = self.rank == 0
        name = f"step-{step:06d}"
        tmp = self.root / f"{name}.tmp"
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        write(tmp)
        if main:
            torch.save(trainer_state, tmp / "trainer.pt")
        barrier()  # every rank's files are in tmp
        final = self.root / name
        if main:
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(name)
            with open(pointer_tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(pointer_tmp, self.root / "latest")
            self._prune(keep_name=name)
        barrier()  # nobody reads or resumes before the checkpoint is published
        return final

    def load(self, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
        """(checkpoint directory, trainer state) of `path` or of the newest checkpoint."""
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        return path, torch.load(path / "trainer.pt", weights_only=False)

    def _prune(self, keep_name: str) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if not p.name.endswith(".tmp"))
        for stale in self.root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in complete[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
