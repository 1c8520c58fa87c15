"""Asynchronous reward scheduling: score completions in worker processes while the trainer goes on.

The R1 paper hides the latency of rule-based rewards (code execution above all) by computing them
asynchronously, overlapped with rollout and log-prob inference. :class:`RewardScheduler` owns a pool of
``num_workers`` processes, each holding a :class:`~r1engine.rewards.combined.CombinedReward` built from
``reward_config``. ``submit`` splits the batch into chunks and returns a :class:`RewardHandle` at once; a
dispatcher thread feeds chunks to idle workers, which score a chunk row by row and send each row's scores back
as soon as they have them; ``handle.result()`` returns the scores in input order.

Routing (:mod:`~r1engine.rewards.routing`): ``reward_config`` may name a route per data source beside the default
weights; ``submit(..., sources=...)`` scores each row with its source's route (chunks never mix routes) and the
batch reports per-source means besides the per-function ones.

Failure policy (a reward must never kill a training step, and a failure costs only its own row):
- a reward function that raises: its samples get ``failure_value`` with reason ``"error: ..."`` (inside
  the worker, by CombinedReward);
- a row taking longer than ``timeout_s``: the worker is killed (its helpers die with it through
  ``PR_SET_PDEATHSIG`` / bubblewrap ``--die-with-parent``), every reward of that row gets ``failure_value``
  with reason ``"timeout"``, a fresh worker replaces it and the chunk's rows not yet scored go back to the
  front of the queue;
- a worker that dies (segfault, OOM kill, ``os._exit``): the same, with reason ``"worker crashed"``.
Each is logged with a warning. Workers are started with the ``spawn`` method (safe beside torch threads).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .combined import CombinedReward, reward_metrics
from .registry import RewardResult, check_batch, get_reward
from .routing import DEFAULT, RewardRoutes

_log = logging.getLogger(__name__)


_CONFIG_KEYS = {"weights", "routes", "options", "imports", "functions"}


def _split_config(reward_config: Mapping[str, Any]) -> tuple[RewardRoutes, dict, list[str], dict]:
    if _CONFIG_KEYS & set(reward_config):
        extra = set(reward_config) - _CONFIG_KEYS
        if extra:
            raise ValueError(f"RewardScheduler: unknown reward_config keys {sorted(extra)}")
        routes = RewardRoutes(reward_config.get("weights") or {}, reward_config.get("routes") or {})
        options, imports = dict(reward_config.get("options") or {}), list(reward_config.get("imports") or [])
        return routes, options, imports, dict(reward_config.get("functions") or {})
    return RewardRoutes(reward_config), {}, [], {}


def build_reward_fns(
    names: Sequence[str], options: Mapping[str, Any], functions: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The reward functions of `names`: the caller's `functions` by name, the others built by name with `options`."""
    functions = functions or {}
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"RewardScheduler: options given for rewards no route uses: {sorted(unknown)}")
    return {name: functions[name] if name in functions else get_reward(name, **options.get(name, {})) for name in names}


def _build_rewards(
    routes: RewardRoutes, options: Mapping[str, Any], failure_value: float, functions: Mapping[str, Any]
) -> dict[str, CombinedReward]:
    """One CombinedReward per route, the reward functions built once and shared between routes."""
    fns = build_reward_fns(routes.names, options, functions)
    return {
        key: CombinedReward(routes.weights(key), failure_value=failure_value, fns=fns)
        for key in routes.keys
        if routes.weights(key)
    }


def _worker_main(conn: mpc.Connection, config: dict, failure_value: float) -> None:
    import importlib

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        routes, options, imports, functions = _split_config(config)
        for mod in imports:
            importlib.import_module(mod)
        rewards = _build_rewards(routes, options, failure_value, functions)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, completions, references, route, columns = msg
        for j in range(len(completions)):  # row by row: the parent times out and re-queues per row
            cols = {k: [v[j]] for k, v in columns.items()} if columns else None
            try:
                res = rewards[route].evaluate([completions[j]], [references[j]], cols)
                conn.send(("row", key, j, {name: results[0] for name, results in res.per_function.items()}))
            except BaseException as e:  # noqa: BLE001 - e.g. a malformed row; reported for that row
                conn.send(("row_failed", key, j, f"error: {type(e).__name__}: {str(e)[:160]}"))


@dataclass
class RewardBatch:
    """Scores of one submitted batch, in input order.

    ``scores[i]``: weighted sum of row i's route; ``per_function[name][i]``: that reward's score (NaN where row i's
    route does not use it); ``reasons[name][i]``: its reason (None for a clean pass/fail or an unused reward);
    ``metrics``: logging dict (see ``reward_metrics``, over the rows each reward scored), ``reward/source/<source>/
    mean`` per data source, ``scheduler/latency_s``, ``scheduler/failed_rows`` (rows whose worker timed out or
    died while scoring them), ``sandbox/weak`` (1.0 while a reward that runs programs uses the weak sandbox).
    """

    scores: list[float]
    per_function: dict[str, list[float]]
    reasons: dict[str, list[str | None]]
    metrics: dict[str, float]


class RewardHandle:
    """A submitted batch; ``result(timeout)`` blocks until every chunk is scored."""

    def __init__(self, sources: list[str], route_of: list[str], routes: RewardRoutes, extra_metrics: dict):
        self._n = len(route_of)
        self._extra_metrics = extra_metrics
        self._sources, self._route_of, self._routes = sources, route_of, routes
        self._results: dict[str, list[RewardResult | None]] = {k: [None] * self._n for k in routes.names}
        self._left = self._n
        self._failed_rows = 0
        self._done = threading.Event()
        self._t0 = time.monotonic()
        self._latency = 0.0
        if self._n == 0:
            self._done.set()

    def _fill(self, row: int, per_function: Mapping[str, RewardResult]) -> None:
        for name, result in per_function.items():
            self._results[name][row] = result
        self._row_done()

    def _fail(self, rows: Sequence[int], route: str, value: float, reason: str, *, worker_failed: bool) -> None:
        for i in rows:
            for name in self._routes.weights(route):
                self._results[name][i] = RewardResult(value, reason)
            self._failed_rows += worker_failed
            self._row_done()

    def _row_done(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._latency = time.monotonic() - self._t0
            self._done.set()

    def done(self) -> bool:
        """True when every chunk has a result."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RewardBatch:
        """Wait (at most ``timeout`` seconds) and return the batch's scores; TimeoutError if not done."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"RewardHandle.result: batch of {self._n} not scored within {timeout}s")
        weights = {route: self._routes.weights(route) for route in set(self._route_of)}
        scores = [
            sum(w * self._results[name][i].score for name, w in weights[self._route_of[i]].items())
            for i in range(self._n)
        ]
        scored = {k: [r for r in v if r is not None] for k, v in self._results.items()}
        default = self._routes.weights(DEFAULT)
        metrics = reward_metrics(scored, scores, {k: default.get(k, 0.0) for k in scored})
        for source in sorted(set(self._sources)):
            rows = [s for s, src in zip(scores, self._sources, strict=True) if src == source]
            metrics[f"reward/source/{source or 'default'}/mean"] = sum(rows) / len(rows)
        metrics["scheduler/latency_s"] = self._latency
        metrics["scheduler/failed_rows"] = float(self._failed_rows)
        metrics.update(self._extra_metrics)
        nan = float("nan")
        return RewardBatch(
            scores=scores,
            per_function={k: [r.score if r is not None else nan for r in v] for k, v in self._results.items()},
            reasons={k: [r.reason if r is not None else None for r in v] for k, v in self._results.items()},
            metrics=metrics,
        )


@dataclass
class _Task:
    handle: RewardHandle
    rows: list[int]
    route: str
    completions: list[str]
    references: list[Any]
    columns: dict[str, list[Any]] | None
    scored: int = 0  # rows of this task the worker has answered (it answers them in order)

    def rest(self) -> _Task | None:
        """The rows not yet answered after the current one, as a task of their own."""
        k = self.scored + 1
        if k >= len(self.rows):
            return None
        cols = {name: values[k:] for name, values in self.columns.items()} if self.columns else None
        return _Task(self.handle, self.rows[k:], self.route, self.completions[k:], self.references[k:], cols)


@dataclass
class _Slot:
    proc: Any
    conn: mpc.Connection
    ready: bool = False
    task: _Task | None = None
    started: float = 0.0
    key: int = 0
    extra: dict = field(default_factory=dict)


class RewardScheduler:
    """Pool of reward worker processes; see the module docstring.

    Args:
        reward_config: ``{"weights": {name: w}, "routes": {source: {name: w}}, "options": {name: {...}},
            "imports": [module, ...], "functions": {name: callable}}`` or just ``{name: w}``. ``functions`` are
            reward functions of the caller's, by the name the routes use (module-level, so they pickle).
            ``weights`` is the default route (may be empty when the routes cover every source); ``imports`` are
            imported in each worker first (to register custom rewards).
        num_workers: worker processes.
        timeout_s: limit for one row in a worker (the worker is killed past it; only that row fails).
        failure_value: score of every reward of a failed/timed-out sample.
        chunk_size: samples per chunk (default: a batch is split in about ``2 * num_workers`` chunks).
    """

    def __init__(
        self,
        reward_config: Mapping[str, Any],
        num_workers: int = 2,
        timeout_s: float = 60.0,
        failure_value: float = 0.0,
        chunk_size: int | None = None,
        start_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"RewardScheduler: num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"RewardScheduler: timeout_s must be > 0, got {timeout_s}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"RewardScheduler: chunk_size must be >= 1 or None, got {chunk_size}")
        self.config = dict(reward_config)
        self.routes, options, imports, functions = _split_config(self.config)
        import importlib
        import pickle

        for mod in imports:
            importlib.import_module(mod)
        fns = build_reward_fns(self.routes.names, options, functions)  # validate names and options here, early
        strengths = [fn.sandbox_strength for fn in fns.values() if hasattr(fn, "sandbox_strength")]
        # Rewards that run programs: 1.0 in every batch's metrics while any of them uses the weak rlimit sandbox.
        self._extra_metrics = {"sandbox/weak": float("rlimit" in strengths)} if strengths else {}
        for name, fn in functions.items():  # the workers are spawned processes: they get the functions pickled
            try:
                pickle.dumps(fn)
            except Exception as exc:
                raise ValueError(
                    f"reward_fns.{name}: the reward workers are separate processes and get reward functions by "
                    f"reference: define {name!r} at the top level of a module (not a lambda or a local function)"
                ) from exc
        self.weights = self.routes.weights(DEFAULT)
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.failure_value = float(failure_value)
        self.chunk_size = chunk_size
        self.start_timeout_s = float(start_timeout_s)
        self.workers_replaced = 0
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._slots: list[_Slot] = []
        self._closed = False
        self._stopped = False
        self._keys = 0
        self._wake_r, self._wake_w = os.pipe()
        for _ in range(self.num_workers):
            self._slots.append(self._spawn())
        self._thread = threading.Thread(target=self._loop, name="reward-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ public API
    def submit(
        self,
        completions: Sequence[str],
        references: Sequence[Any],
        sources: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> RewardHandle:
        """Queue a batch for scoring and return at once. `sources[i]`: row i's data source (None: the default
        route for every row); `columns`: the rows' other data-set fields, one list per column, for custom rewards
        that take them (`CombinedReward.evaluate`)."""
        check_batch("RewardScheduler.submit", completions, references)
        if self._closed:
            raise RuntimeError("RewardScheduler.submit: the scheduler is closed")
        n = len(completions)
        sources = [""] * n if sources is None else [str(s) for s in sources]
        if len(sources) != n:
            raise ValueError(f"RewardScheduler.submit: {len(sources)} sources for {n} completions")
        for name, values in (columns or {}).items():
            if len(values) != n:
                raise ValueError(f"RewardScheduler.submit: column {name!r} has {len(values)} values for {n} rows")
        route_of = [self.routes.route_of(s) for s in sources]
        by_route: dict[str, list[int]] = {}
        for i, route in enumerate(route_of):
            by_route.setdefault(route, []).append(i)
        size = self.chunk_size or max(1, math.ceil(n / (2 * self.num_workers)))
        chunks = [(route, rows[s : s + size]) for route, rows in by_route.items() for s in range(0, len(rows), size)]
        handle = RewardHandle(sources, route_of, self.routes, self._extra_metrics)
        with self._lock:
            for route, rows in chunks:
                cols = {k: [v[i] for i in rows] for k, v in columns.items()} if columns else None
                task = _Task(handle, rows, route, [completions[i] for i in rows], [references[i] for i in rows], cols)
                self._pending.append(task)
        os.write(self._wake_w, b"x")
        return handle

    def score(
        self,
        completions: Sequence[str],
        references: Sequence[Any],
        timeout: float | None = None,
        sources: Sequence[str] | None = None,
    ) -> RewardBatch:
        """Synchronous convenience: ``submit(...).result(timeout)``."""
        return self.submit(completions, references, sources).result(timeout)

    def close(self) -> None:
        """Stop the dispatcher and the workers; pending batches fail with reason "scheduler closed"."""
        if self._stopped:
            return
        self._stopped = True
        self._closed = True
        try:
            os.write(self._wake_w, b"q")
        except OSError:
            pass
        self._thread.join(timeout=10)
        for slot in self._slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for slot in self._slots:
            slot.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(timeout=5)
            slot.conn.close()
            if slot.task is not None:
                t = slot.task
                t.handle._fail(t.rows[t.scored :], t.route, self.failure_value, "scheduler closed", worker_failed=False)
                slot.task = None
        self._slots = []
        with self._lock:
            while self._pending:
                t = self._pending.popleft()
                t.handle._fail(t.rows, t.route, self.failure_value, "scheduler closed", worker_failed=False)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> RewardScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if hasattr(self, "_thread"):
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------ internals
    def _spawn(self) -> _Slot:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.config, self.failure_value), name="reward-worker", daemon=True
        )
        proc.start()
        child.close()
        return _Slot(proc=proc, conn=parent, started=time.monotonic())

    def _replace(self, i: int, reason: str) -> None:
        slot = self._slots[i]
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(timeout=5)
        slot.conn.close()
        if slot.task is not None:
            t, slot.task = slot.task, None
            row = t.rows[t.scored]
            _log.warning(
                "reward scheduler: row %d (route %r) failed (%s); scored %s, worker replaced",
                row, t.route or "default", reason, self.failure_value,
            )  # fmt: skip
            t.handle._fail([row], t.route, self.failure_value, reason, worker_failed=True)
            rest = t.rest()
            if rest is not None:
                with self._lock:
                    self._pending.appendleft(rest)
        self.workers_replaced += 1
        self._slots[i] = self._spawn()

    def _dispatch(self) -> None:
        for slot in self._slots:
            if slot.ready and slot.task is None:
                with self._lock:
                    if not self._pending:
                        return
                    task = self._pending.popleft()
                self._keys += 1
                slot.key, slot.task, slot.started = self._keys, task, time.monotonic()
                try:
                    slot.conn.send((slot.key, task.completions, task.references, task.route, task.columns))
                except (OSError, ValueError):
                    pass  # noticed as a dead worker below

    def _loop(self) -> None:
        while not self._closed:
            self._dispatch()
            now = time.monotonic()
            waits = []
            for s in self._slots:
                if s.task is not None:
                    waits.append(s.started + self.timeout_s - now)
                elif not s.ready:
                    waits.append(s.started + self.start_timeout_s - now)
            timeout = max(0.0, min(waits)) if waits else None
            objs = [self._wake_r] + [s.conn for s in self._slots] + [s.proc.sentinel for s in self._slots]
            ready = mpc.wait(objs, timeout=timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self._closed:
                return
            for i, slot in enumerate(list(self._slots)):
                if slot.conn in ready or slot.conn.poll():
                    try:
                        msg = slot.conn.recv()
                    except (EOFError, OSError):
                        self._replace(i, "worker crashed")
                        continue
                    self._on_message(i, slot, msg)
                elif slot.proc.sentinel in ready or not slot.proc.is_alive():
                    self._replace(i, "worker crashed")
            now = time.monotonic()
            for i, slot in enumerate(list(self._slots)):
                if slot.task is not None and now - slot.started > self.timeout_s:
                    self._replace(i, "timeout")
                elif not slot.ready and now - slot.started > self.start_timeout_s:
                    _log.error("reward scheduler: a worker did not start within %.0fs", self.start_timeout_s)
                    self._replace(i, "worker crashed")

    def _on_message(self, i: int, slot: _Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.ready = True
        elif kind == "init_error":
            _log.error("reward scheduler: worker failed to build the rewards: %s", msg[1])
            self._closed_by_error(msg[1])
        elif kind in ("row", "row_failed") and slot.task is not None and msg[1] == slot.key:
            t, row = slot.task, slot.task.rows[msg[2]]
            if kind == "row":
                t.handle._fill(row, msg[3])
            else:
                _log.warning("reward scheduler: row %d failed: %s", row, msg[3])
                t.handle._fail([row], t.route, self.failure_value, msg[3], worker_failed=False)
            t.scored = msg[2] + 1
            slot.started = time.monotonic()  # the next row's clock
            if t.scored == len(t.rows):
                slot.task = None

    def _closed_by_error(self, err: str) -> None:
        # Workers cannot build the rewards (the parent could): fail everything rather than respawn forever.
        self._closed = True
        with self._lock:
            while self._pending:
                t = self._pending.popleft()
                t.handle._fail(t.rows, t.route, self.failure_value, f"error: worker init: {err}", worker_failed=False)
        for slot in self._slots:
            if slot.task is not None:
                t, slot.task = slot.task, None
                reason = f"error: worker init: {err}"
                t.handle._fail(t.rows[t.scored :], t.route, self.failure_value, reason, worker_failed=False)
