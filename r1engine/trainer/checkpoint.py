"""Atomic training checkpoints: a crash at any point leaves either the previous checkpoint or the new one, and a
damaged checkpoint is never the end of a run's history.

Layout under `<output_dir>/checkpoints/`:
    step-000040/           model/ (safetensors + config + tokenizer, loadable by vLLM), trainer.pt, and what each
                           rank writes (DeepSpeed's partitioned optimizer state, per-rank RNG states rng-rankN.pt)
    latest                 the name of the newest complete checkpoint (replaced atomically)
    step-000060.damaged/   a checkpoint that could not be resumed from, set aside (never deleted) by `resume`
A checkpoint is written into `step-XXXXXX.tmp`, flushed to disk, renamed into place, and only then is `latest`
switched to it; half-written `.tmp` directories are ignored and cleaned up. On several ranks, rank 0 owns the
directory and the renames, and barriers order them around every rank's writes.

Resuming (`resume`) reads the newest checkpoint that is intact: its files are checked (`verify`), its trainer state
loaded and the caller's reader run on it; a damaged one (a truncated or missing file, a JSON file that does not
parse, a missing RNG file) is skipped with a warning naming the problem, and once an older one loads, the newer
damaged ones are renamed `step-XXXXXX.damaged` so that the resumed run never writes over them. `latest` is only a
hint: when it holds garbage or names a missing directory, the directories themselves are scanned.

A run's history in `output_dir` (metrics.jsonl, metrics.png, tensorboard/, checkpoints/) is never deleted or
overwritten implicitly: when it holds a previous run and no checkpoint can be resumed from, `resume` stops with a
`CheckpointError` that says how to start over; `set_aside_previous_run` (checkpoint.resume=false) moves the previous
run's files into `output_dir/previous-N/`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from r1engine.trainer.distributed import barrier

log = logging.getLogger(__name__)

T = TypeVar("T")

_STEP_DIR = re.compile(r"step-(\d+)")
# What a run writes into output_dir: moved together into output_dir/previous-N/ when a run starts over.
RUN_FILES = ("metrics.jsonl", "metrics.png", "tensorboard", "checkpoints")


class CheckpointError(ValueError):
    """A run that cannot go on from its output_dir without losing history (the message names the directory and
    says how to start over), or a checkpoint that does not fit this run."""


class DamagedCheckpoint(Exception):
    """A checkpoint directory that cannot be resumed from; the message says what is wrong with it."""


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


def _check_torch_file(path: Path, root: Path) -> None:
    """A `torch.save` file is a zip archive with its directory at the end: a truncated or overwritten one fails to
    open (checked without reading the tensors)."""
    name = path.relative_to(root)
    if not path.is_file():
        raise DamagedCheckpoint(f"{name} is missing")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as exc:
        raise DamagedCheckpoint(f"{name} is damaged (not a complete torch.save file: {exc})") from None


def _check_safetensors(path: Path, root: Path) -> None:
    """The header of a safetensors file parses and the file holds every byte its tensors' offsets reach."""
    name = path.relative_to(root)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError(f"its header needs {8 + n} bytes, the file has {size}")
            header = json.loads(f.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DamagedCheckpoint(f"{name} is damaged (its safetensors header does not parse: {exc})") from None
    if 8 + n + end > size:
        raise DamagedCheckpoint(f"{name} is cut short ({size} of {8 + n + end} bytes)")


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep: int = 2, rank: int = 0):
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.keep = keep
        self.rank = rank

    # ------------------------------------------------------------------------------------------- finding
    def complete(self) -> list[Path]:
        """Every published checkpoint directory (`step-N`; not `.tmp` or set-aside ones), newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    def _pointer(self) -> str | None:
        """The name in `latest`, warned about when it does not name a checkpoint directory (it is only a hint)."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s is unreadable (%s): looking for the newest checkpoint instead", pointer, exc)
            return None
        if not _STEP_DIR.fullmatch(name):
            log.warning("%s holds %r, not a checkpoint name: looking for the newest checkpoint instead", pointer,
                        name[:80])  # fmt: skip
            return None
        if not (self.root / name).is_dir():
            log.warning("%s names %s, which does not exist: looking for the newest checkpoint instead", pointer, name)
            return None
        return name

    def verify(self, path: Path) -> None:
        """Check, without loading any tensors, the files a resume reads from checkpoint `path`: trainer.pt, the RNG
        files (rank 0's at least) and every other `.pt` file (DeepSpeed's optimizer shards) are complete torch.save
        archives, every JSON file parses, model/ has its config.json and complete safetensors weights. Raises
        DamagedCheckpoint naming the problem."""
        if not path.is_dir():
            raise DamagedCheckpoint("the directory is missing")
        _check_torch_file(path / "trainer.pt", path)
        _check_torch_file(path / "rng-rank0.pt", path)
        for f in sorted(path.rglob("*.pt")):  # the RNG files of every rank, DeepSpeed's shards (all torch.save files)
            _check_torch_file(f, path)
        for f in sorted(path.rglob("*.json")):
            try:
                json.loads(f.read_text())
            except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
                raise DamagedCheckpoint(f"{f.relative_to(path)} is not valid JSON ({exc})") from None
        model = path / "model"
        if not (model / "config.json").is_file():
            raise DamagedCheckpoint("model/config.json is missing")
        weights = sorted(model.glob("*.safetensors"))
        index = model / "model.safetensors.index.json"
        if index.is_file():
            listed = json.loads(index.read_text()).get("weight_map", {}).values()
            weights = sorted({model / f for f in listed})
        if not weights and not list(model.glob("pytorch_model*.bin")):
            raise DamagedCheckpoint("model/ holds no weights (model.safetensors is missing)")
        for f in weights:
            if not f.is_file():
                raise DamagedCheckpoint(f"{f.relative_to(path)} is missing")
            _check_safetensors(f, path)

    def latest(self) -> Path | None:
        """The newest checkpoint that passes `verify`, or None; newer damaged ones are skipped with a warning."""
        self._pointer()
        for path in self.complete():
            try:
                self.verify(path)
            except DamagedCheckpoint as exc:
                log.warning("checkpoint %s is damaged (%s): skipped", path, exc)
                continue
            return path
        return None

    def load(self, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
        """(checkpoint directory, trainer state) of `path` or of the newest intact checkpoint."""
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        return path, self.read_state(path)

    def read_state(self, path: Path) -> dict[str, Any]:
        """The trainer state of checkpoint `path` once it verifies and every rank's RNG file is there; raises
        DamagedCheckpoint naming the problem."""
        self.verify(path)
        try:
            state = torch.load(path / "trainer.pt", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a damaged file
            raise DamagedCheckpoint(f"trainer.pt does not load ({type(exc).__name__}: {exc})") from None
        if isinstance(state, dict):
            missing = [f"rng-rank{r}.pt" for r in range(int(state.get("world_size", 1))) if
                       not (path / f"rng-rank{r}.pt").is_file()]  # fmt: skip
            if missing:
                raise DamagedCheckpoint(f"{', '.join(missing)} missing (written by {state['world_size']} ranks)")
        return state

    # ------------------------------------------------------------------------------------------- resuming
    def resume(self, read: Callable[[Path, dict[str, Any]], T] | None = None) -> tuple[Path, dict[str, Any], T] | None:
        """Rank 0: (checkpoint, trainer state, `read(checkpoint, state)`) of the newest checkpoint that verifies,
        whose trainer.pt loads and that `read` loads without raising (a CheckpointError from `read` is not damage:
        it stops the search); None when output_dir holds no previous run.

        A damaged checkpoint is skipped with a warning naming the problem; the newer damaged ones are renamed
        `step-XXXXXX.damaged` (kept, never deleted) once an older one loads, and `latest` is pointed at it. When a
        previous run exists but nothing loads, raises CheckpointError naming output_dir and how to start over."""
        self._pointer()
        damaged: list[tuple[Path, str]] = []
        for path in self.complete():
            try:
                state = self.read_state(path)
                result = read(path, state) if read is not None else None
            except CheckpointError:
                raise
            except DamagedCheckpoint as exc:
                why = str(exc)
            except Exception as exc:  # noqa: BLE001 - whatever the reader could not load: try the next older one
                why = f"{type(exc).__name__}: {exc}"
            else:
                for bad, _ in damaged:
                    aside = self._set_aside(bad, "damaged")
                    log.warning("kept the damaged checkpoint %s as %s (never deleted: remove it when you no longer "
                                "need it)", bad, aside.name)  # fmt: skip
                if damaged:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                self._publish_pointer(path.name)
                return path, state, result
            damaged.append((path, why))
            log.warning("checkpoint %s is damaged (%s): trying an older one", path, why)
        previous = self.previous_run()
        if not previous:
            return None
        problems = "; ".join(f"{p.name}: {why}" for p, why in damaged) or "there is no checkpoint"
        raise CheckpointError(
            f"output_dir {str(self.output_dir)!r} holds a previous run ({', '.join(previous)}) but no checkpoint to "
            f"resume from ({problems}). Nothing was changed; to start over, pass checkpoint.resume=false (the previous "
            f"run's files are moved into {str(self.output_dir / 'previous-N')!r}) or choose another output_dir"
        )

    def previous_run(self) -> list[str]:
        """What output_dir holds of an earlier run (a non-empty metrics.jsonl, checkpoint directories), described."""
        found = []
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append("metrics.jsonl")
        if self.root.is_dir():
            dirs = [p for p in self.root.glob("step-*") if not p.name.endswith(".tmp")]
            if dirs:
                found.append(f"{len(dirs)} checkpoint director{'y' if len(dirs) == 1 else 'ies'}")
        return found

    def set_aside_previous_run(self) -> Path | None:
        """Rank 0: move the previous run's files (metrics, plot, TensorBoard log, checkpoints) into a new
        `output_dir/previous-N/` so that a run starting over writes over nothing; returns it, or None when output_dir
        holds no previous run."""
        previous = self.previous_run()
        if not previous:
            return None
        n = 1
        while (self.output_dir / f"previous-{n}").exists():
            n += 1
        target = self.output_dir / f"previous-{n}"
        target.mkdir()
        for name in RUN_FILES:
            if (self.output_dir / name).exists():
                os.replace(self.output_dir / name, target / name)
        log.warning("checkpoint.resume=false: output_dir %s held a previous run (%s); moved it into %s (delete it to "
                    "free the space)", self.output_dir, ", ".join(previous), target)  # fmt: skip
        return target

    def _set_aside(self, path: Path, label: str) -> Path:
        """Rename checkpoint `path` to `<name>.<label>` (`-2`, `-3`, ... when taken); returns the new path."""
        target, n = path.with_name(f"{path.name}.{label}"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.{label}-{n}")
        os.replace(path, target)
        return target

    def _publish_pointer(self, name: str) -> None:
        pointer = self.root / "latest"
        try:
            if pointer.is_file() and pointer.read_text() == name:
                return
        except (OSError, UnicodeDecodeError):
            pass
        pointer_tmp = self.root / "latest.tmp"
        pointer_tmp.write_text(name)
        with open(pointer_tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, pointer)

    # ------------------------------------------------------------------------------------------- saving
    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict[str, Any] | None) -> Path:
        """Write checkpoint `step`. Every rank calls this: `write(directory)` runs on every rank (collective writers
        such as DeepSpeed's sharded checkpoint, per-rank files); rank 0 pickles `trainer_state` (other ranks may
        pass None) and publishes the checkpoint. A directory of the same step already there (not expected: a resumed
        run sets newer ones aside) is renamed `step-XXXXXX.replaced`, with a warning, not overwritten."""
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
            if final.exists():
                aside = self._set_aside(final, "replaced")
                log.warning("checkpoint %s already existed: kept as %s", final, aside.name)
            os.replace(tmp, final)
            self._publish_pointer(name)
            self._prune(keep_name=name)
        barrier()  # nobody reads or resumes before the checkpoint is published
        return final

    def _prune(self, keep_name: str) -> None:
        """Delete the published checkpoints beyond the newest `keep` (set-aside ones are never deleted) and
        half-written `.tmp` directories."""
        for stale in self.root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.complete()[self.keep :]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
