"""`RolloutPool`: several rollout worker processes behind one trainer rank, driven as one engine.

Each generation's prompts are split into consecutive shards, one per worker (sizes differ by at most one), and the
shards' batches are joined back in prompt order (`concat_batches`), so the trainer sees one `RolloutBatch` as from
one engine. A prompt keeps the seed a single engine would give it (a shard starting at prompt j is submitted with
`seed + j`, as vLLM seeds prompt i with `seed + i`); the native engine draws one stream per call, so there the
shards' samples differ from one call's (in distribution they agree; greedy ones are equal).

Weights go to every worker at once: the workers are ranks 1..n of one `WeightGroup` with the trainer, so an update
is planned, copied and broadcast once for all of them (`broadcast_weights`). All workers always hold the same
version. A worker that dies raises its `RolloutWorkerDied` from the call that notices it, as a single engine does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from r1engine.rollout.base import RolloutBatch, RolloutStats, check_same_config, concat_batches
from r1engine.rollout.remote import broadcast_weights, is_whole_group
from r1engine.rollout.weight_transfer import IncompleteGroup, WeightGroup


def shard_bounds(num_prompts: int, num_workers: int) -> list[tuple[int, int]]:
    """[start, end) of each non-empty shard when `num_prompts` prompts are split over `num_workers` workers."""
    base, extra = divmod(num_prompts, num_workers)
    bounds, start = [], 0
    for w in range(num_workers):
        end = start + base + (1 if w < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class PoolHandle:
    """A generation split over the workers: `done()` when every shard is, `result()` the joined batch."""

    def __init__(self, pool: RolloutPool, handles: list[Any]) -> None:
        self._pool = pool
        self._handles = handles
        self._batch: RolloutBatch | None = None

    def done(self) -> bool:
        return self._batch is not None or all(h.done() for h in self._handles)

    def result(self, timeout: float | None = None) -> RolloutBatch:
        """The joined batch (the same object on every call); raises what a worker raised. `timeout` bounds each
        shard's wait."""
        if self._batch is None:
            self._batch = concat_batches([h.result(timeout) for h in self._handles], concurrent=True)
            self._pool.last_stats = self._batch.stats
        return self._batch


class RolloutPool:
    """Several `RemoteRolloutEngine`s as one; see the module docstring. `engines`: started workers, all from one
    checkpoint, at one version and the ranks of one `WeightGroup` (`RolloutPool.start` builds them so)."""

    remote = True

    def __init__(self, engines: Sequence[Any]) -> None:
        if not engines:
            raise ValueError("RolloutPool needs at least one engine")
        first = engines[0]
        for e in engines[1:]:
            if e.config != first.config or e.version != first.version:
                raise ValueError(
                    f"RolloutPool: every worker must serve one model at one version; worker 0 has version "
                    f"{first.version}, another {e.version} (or a different config)"
                )
        if not is_whole_group(engines):
            raise ValueError(
                "RolloutPool: the workers must be the ranks of one WeightGroup (start them with RolloutPool.start)"
            )
        self.engines = list(engines)
        self.backend: str = first.backend
        self.num_speculative_tokens: int = first.num_speculative_tokens
        self.max_model_len: int = first.max_model_len
        self.config = first.config
        self.last_stats: RolloutStats | None = None
        self.last_sync: dict[str, float] = {}

    @classmethod
    def start(
        cls, num_workers: int, make: Callable[[int, WeightGroup], Any], *, model: Any = None, timeout_s: float = 300.0
    ) -> RolloutPool:
        """Start `num_workers` workers at once: `make(w, group)` builds worker w as rank w + 1 of `group`, e.g.
        `RemoteRolloutEngine(..., group=group, rank=w + 1)`. `model`: the trainer's, whose weights the workers
        started elsewhere (`listen`) take at once. `timeout_s` bounds each weight broadcast. If one worker fails to
        start, the others are closed and its error raised."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        group = WeightGroup(num_workers + 1, timeout_s)
        with ThreadPoolExecutor(num_workers, thread_name_prefix="r1engine-rollout-start") as ex:
            futures = [ex.submit(make, w, group) for w in range(num_workers)]
        engines, errors = [], []
        for f in futures:
            try:
                engines.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below once the started ones are closed
                errors.append(exc)
        if errors:  # the cause, rather than the other workers' wait for the one that failed to join
            error = next((e for e in errors if not isinstance(e, IncompleteGroup)), errors[0])
            for e in engines:
                e.close()
            raise error
        pool = cls(engines)
        if model is not None and any(e.external for e in engines):  # their copies of the checkpoint may be older
            try:
                pool.sync_weights(model, version=pool.version)
            except BaseException:
                pool.close()
                raise
        return pool

    @property
    def version(self) -> int:
        return self.engines[0].version

    @property
    def pids(self) -> list[int | None]:
        return [e.pid for e in self.engines]

    # ------------------------------------------------------------------------------------------- generation
    def submit(self, prompt_ids: list[list[int]], *, seed: int | None = None, **kwargs: Any) -> PoolHandle:
        """Queue a generation split over the workers (arguments as `RemoteRolloutEngine.submit`)."""
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError(f"prompt_ids must be a non-empty list of token-id lists, got {type(prompt_ids).__name__}")
        shards = shard_bounds(len(prompt_ids), len(self.engines))  # fewer prompts than workers: some sit out
        handles = [
            engine.submit(list(prompt_ids[start:end]), seed=None if seed is None else int(seed) + start, **kwargs)
            for engine, (start, end) in zip(self.engines[: len(shards)], shards, strict=True)
        ]
        return PoolHandle(self, handles)

    def generate(self, prompt_ids: list[list[int]], **kwargs: Any) -> RolloutBatch:
        return self.submit(prompt_ids, **kwargs).result()

    # ------------------------------------------------------------------------------------------- weights / memory
    def _on_all(self, call: Callable[[Any], Any]) -> list[Any]:
        return [call(e) for e in self.engines]

    def _last_sync(self) -> dict[str, float]:
        """The last finished update (one broadcast for all workers: its bytes and buckets are one worker's)."""
        last = self.engines[0].last_sync
        if last:
            self.last_sync = dict(last, workers=float(len(self.engines)))
        return self.last_sync

    @torch.no_grad()
    def sync_weights(self, model: Any, version: int | None = None) -> dict[str, float]:
        """As `RemoteRolloutEngine.sync_weights`, for every worker at once; they all reach the same version."""
        check_same_config("sync_weights", model.config, self.config, "engines'")
        return self.load_named_weights(model.named_weights(), version)

    @torch.no_grad()
    def load_named_weights(self, weights, version: int | None = None) -> dict[str, float]:
        new_version = self.version + 1 if version is None else int(version)
        broadcast_weights(self.engines, weights, new_version, wait=True)
        return self._last_sync()

    @torch.no_grad()
    def push_weights(self, model: Any, version: int | None = None) -> None:
        """As `RemoteRolloutEngine.push_weights`, for every worker at once (the weights are copied once)."""
        check_same_config("push_weights", model.config, self.config, "engines'")
        new_version = self.version + 1 if version is None else int(version)
        broadcast_weights(self.engines, model.named_weights(), new_version, wait=False)
        self._last_sync()

    def offload(self) -> None:
        self._on_all(lambda e: e.offload())

    def onload(self) -> None:
        self._on_all(lambda e: e.onload())

    # ------------------------------------------------------------------------------------------- lifetime
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (idempotent)."""
        for e in self.engines:
            e.close(timeout_s)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
