"""`RemoteRolloutEngine`: a rollout engine (native or vLLM) in a process of its own, driven from the trainer.

The trainer asks for a generation with `submit(...)`, goes on (training), and collects the `RolloutBatch` later
from the returned handle (`generate` is `submit(...).result()`). Requests travel over a pipe and are served in
order (`r1engine.rollout.remote_worker`); weights travel as tensors over a process group of the two processes'
own (`r1engine.rollout.weight_transfer`: gloo through host memory, NCCL between two GPUs), or over one group shared
by the workers of a `RolloutPool` (`broadcast_weights` sends them once to all), MTP layers included, and the worker
loads them with its engine's `load_named_weights`, the code the in-process `sync_weights` runs.

Versions: the engine starts at version 0 (the weights in `model_dir`); each `sync_weights` makes the next one (or
the caller's number), and every token of a batch carries the version that sampled it (`RolloutBatch.versions`).
Weights are pushed only while the worker is idle: `sync_weights` first waits for the generations already
submitted, which finish with the old weights (their handles still return them); `push_weights` (asynchronous RL)
copies the weights and queues them behind those generations without waiting, for the ones submitted after it. A
generation submitted with `segment_tokens` is a partial rollout (`r1engine.rollout.partial`): pushed weights that
reach the worker while it runs are loaded at its next segment boundary, and its remaining tokens (and those of the
generations queued behind it) sample with them.

A worker that dies (killed, out of memory) is noticed while waiting for it (the pipe is polled with a timeout and
the process checked) or at the next call, which raise `RolloutWorkerDied` with its exit code. The worker exits on
`close()`, when this engine is garbage-collected or the interpreter exits, and by itself when the trainer process
is gone (it checks its parent pid), so it never outlives the trainer. The worker is spawned: a script that creates
the engine at its top level needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.util import Finalize
from typing import Any

import torch
import torch.multiprocessing as mp

from r1engine.rollout.base import RolloutBatch, RolloutStats, check_same_config, validate_prompts
from r1engine.rollout.external import ExternalWorker
from r1engine.rollout.remote_worker import WorkerSpec, recv, send, unpack_batch, worker_main
from r1engine.rollout.weight_transfer import (
    TRANSPORTS,
    WeightGroup,
    plan_buckets,
    send_weights,
    start_send,
    transport_device,
)

_POLL_S = 0.2  # how often a waiting trainer checks that the worker is still alive


class RolloutWorkerDied(RuntimeError):
    """The rollout worker process exited while it had work or was asked for some; the engine is unusable."""

    def __init__(self, pid: int, exitcode: int | None, during: str) -> None:
        if exitcode is None:
            how = "exit code unknown"
        elif exitcode < 0:
            how = f"killed by {signal.Signals(-exitcode).name} (exit code {exitcode})"
        else:
            how = f"exit code {exitcode}"
        super().__init__(
            f"rollout worker process {pid} died ({how}) {during}; this RemoteRolloutEngine cannot be used any "
            "more: close() it and start a new one"
        )
        self.pid = pid
        self.exitcode = exitcode


class RolloutHandle:
    """A submitted generation: `done()` without blocking, `result(timeout)` for the `RolloutBatch`."""

    def __init__(self, engine: RemoteRolloutEngine, rid: int) -> None:
        self._engine = engine
        self.request_id = rid
        self._batch: RolloutBatch | None = None

    def done(self) -> bool:
        return self._batch is not None or self._engine._ready(self.request_id)

    def result(self, timeout: float | None = None) -> RolloutBatch:
        """The batch (the same object on every call); raises what the worker raised, `RolloutWorkerDied`, or
        `TimeoutError` after `timeout` seconds (the request stays pending)."""
        if self._batch is None:
            self._batch = unpack_batch(self._engine._wait(self.request_id, timeout, "waiting for a generation"))
            self._engine.last_stats = self._batch.stats
        return self._batch


def _choose_transport(transport: str, device: str | None) -> str:
    """'auto': NCCL when the worker has a CUDA device of its own (NCCL needs one GPU per rank), else gloo."""
    if transport != "auto":
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be 'auto' or one of {TRANSPORTS}, got {transport!r}")
        return transport
    d = torch.device(device) if device is not None else None
    if d is not None and d.type == "cuda" and d.index is not None and torch.cuda.is_available():
        if torch.cuda.device_count() > 1 and d.index != torch.cuda.current_device():
            return "nccl"
    return "gloo"


def _shutdown(process, conn, tmpdir: str | None, timeout_s: float) -> None:
    """Stop the worker (politely, then SIGTERM, then SIGKILL) and release what the engine held."""
    try:
        if process.is_alive():
            try:
                send(conn, ("close", -1, None))
            except OSError:
                pass
            process.join(timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    finally:
        conn.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


class RemoteRolloutEngine:
    """A `RolloutEngine` whose engine runs in a spawned worker process; see the module docstring.

    backend: the worker's engine ("native", "vllm" or "auto", as `create_engine`); `model_dir`: the checkpoint it
    starts from, or `model` (a PolicyModel, written to a temporary directory once). `device`: the worker's torch
    device (the native engine's; vLLM places itself). `transport`: "gloo", "nccl" or "auto" (see
    `_choose_transport`). `bucket_bytes`: size of one weight broadcast. `num_threads`: the worker's intra-op
    threads. `timeout_s` bounds each weight broadcast (in a shared `group`: the group's), `start_timeout_s` the
    worker's start-up (engine build included). `listen`: "host:port" to wait on for a worker started elsewhere
    (`r1engine rollout-worker`, `r1engine.rollout.external`) instead of spawning one; it builds its engine from its
    own `--model-dir` (default `model_dir`, or where `model` was written: the same path on a shared file system) and
    takes `model`'s weights at once (in a shared group: from `RolloutPool.start`). `group`, `rank`: join a
    `WeightGroup` shared with other workers as that rank (a pool's; its weights then go through `broadcast_weights`
    to all of them at once) instead of a group of this worker's own. Other keyword arguments go to `create_engine`
    in the worker.
    """

    remote = True

    def __init__(
        self,
        backend: str = "native",
        *,
        model_dir: str | os.PathLike | None = None,
        model: Any = None,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        transport: str = "auto",
        bucket_bytes: int = 64 << 20,
        num_threads: int | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 900.0,
        listen: str | None = None,
        group: WeightGroup | None = None,
        rank: int = 1,
        **engine_kwargs: Any,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        device = str(device) if device is not None else None
        self.transport = _choose_transport(transport, device)
        self._tmpdir = None
        if model_dir is None:
            if model is None:
                raise ValueError("RemoteRolloutEngine needs model_dir= (a saved model directory) or model=")
            self._tmpdir = tempfile.mkdtemp(prefix="r1engine-remote-")
            model.save_pretrained(self._tmpdir, engine_kwargs.get("tokenizer"))  # vLLM reads the tokenizer there
            model_dir = self._tmpdir
        elif not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"model_dir {model_dir} has no config.json (not a model directory)")
        self.bucket_bytes = int(bucket_bytes)
        self.version = 0
        self.last_stats: RolloutStats | None = None
        self.last_sync: dict[str, float] = {}
        self._ids = itertools.count()
        self._results: dict[int, tuple[str, Any]] = {}
        self._pending: set[int] = set()
        self._lock = threading.RLock()
        self._dead: RolloutWorkerDied | None = None
        self._closed = False
        self._push: tuple[int, list, list, float] | None = None  # push_weights in flight: (request, works, buffers, t0)
        self.external = listen is not None
        if group is None:
            group, rank = WeightGroup(2, timeout_s), 1
        elif not 1 <= rank < group.world_size:
            raise ValueError(f"rank must be in 1..{group.world_size - 1} (the group's workers), got {rank}")
        self.weight_group: WeightGroup | None = group
        self.timeout_s = group.timeout_s  # a shared group's bounds its every broadcast

        kwargs = dict(engine_kwargs, num_speculative_tokens=num_speculative_tokens, max_model_len=max_model_len)
        spec = WorkerSpec(
            backend=backend,
            model_dir=str(model_dir),
            engine_kwargs=kwargs,
            store_port=group.port,
            rank=rank,
            world_size=group.world_size,
            transport=self.transport,
            device=device,
            timeout_s=self.timeout_s,
            num_threads=num_threads,
        )
        group_host = "127.0.0.1"
        if listen is not None:
            self._process = ExternalWorker.accept(listen, start_timeout_s)
            self._conn, group_host = self._process.conn, self._process.local_host
            send(self._conn, ("spec", -1, spec))
        else:
            ctx = mp.get_context("spawn")
            self._conn, child = ctx.Pipe(duplex=True)
            # not a daemon, so the worker may start processes of its own (vLLM's executors); it is stopped by
            # close(), by the finalizer below at garbage collection or exit, and by its own parent watch.
            # multiprocessing's Finalize with an exit priority runs before multiprocessing joins its non-daemon
            # children at exit (a weakref.finalize may run after that join, which would then wait forever)
            self._process = ctx.Process(target=worker_main, args=(child, spec), name="r1engine-rollout", daemon=False)
            self._process.start()
            child.close()  # ours only in the worker: the worker sees EOF once this process's end closes
        self._finalizer = Finalize(
            self, _shutdown, args=(self._process, self._conn, self._tmpdir, 10.0), exitpriority=10
        )
        try:
            deadline = time.monotonic() + start_timeout_s
            # spawn re-runs the trainer's main script in the worker: an unguarded script dies right here
            self._expect(
                "hello",
                deadline,
                "while starting (its error is on stderr; a script that starts an engine "
                "at its top level needs `if __name__ == '__main__':`, as spawned processes re-run it)",
            )
            # the worker is alive and joins now: constructing our side blocks until every worker has (gloo)
            self._group = group.join(self.transport, group_host)
            info = self._expect("ready", deadline, "while building its engine")
            if listen is not None and model is not None:  # the worker's copy may be older: replace it at once
                if info["config"] != model.config:
                    raise ValueError(
                        f"the rollout worker's model (its --model-dir, or {model_dir}) has config "
                        f"{info['config']}, the trainer's model {model.config}: start it from the same checkpoint"
                    )
                self.config = info["config"]
                if not self.shares_group:  # a pool sends them to all its workers at once
                    self.load_named_weights(model.named_weights(), version=info["version"])
        except BaseException:
            self.close()
            raise
        self.backend: str = info["backend"]
        self.num_speculative_tokens: int = info["num_speculative_tokens"]
        self.max_model_len: int = info["max_model_len"]
        self.config = info["config"]
        self.version = info["version"]
        self.model_dir = str(model_dir)

    # ------------------------------------------------------------------------------------------- plumbing
    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def shares_group(self) -> bool:
        """Whether other workers take their weights over this one's group (then only `broadcast_weights` over all
        of them can send any)."""
        return self.weight_group is not None and self.weight_group.world_size > 2

    def _expect(self, kind: str, deadline: float, during: str) -> Any:
        """Wait for a start-up message; a start-up error is raised here, as the in-process engine would raise it."""
        while True:
            if self._conn.poll(_POLL_S):
                try:
                    msg, key, payload = recv(self._conn)
                except (EOFError, OSError):
                    self._raise_died(during)
                if msg == "error":
                    self._raise_remote(payload)
                if msg != kind:
                    raise RuntimeError(f"rollout worker protocol: expected {kind!r}, got {msg!r}")
                return payload if kind == "ready" else key
            if not self._process.is_alive():
                self._raise_died(during)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout worker did not finish starting {during} within start_timeout_s")

    def _raise_died(self, during: str):
        self._process.join(1.0)  # reap it, so that its exit code is known
        self._dead = RolloutWorkerDied(self._process.pid, self._process.exitcode, during)
        raise self._dead

    @staticmethod
    def _raise_remote(payload: tuple[BaseException, str]):
        exc, tb = payload
        exc.add_note(f"raised in the rollout worker process:\n{tb}")
        raise exc

    def _check_usable(self, during: str) -> None:
        if self._closed:
            raise RuntimeError("this RemoteRolloutEngine is closed")
        if self._dead is not None:
            raise RolloutWorkerDied(self._dead.pid, self._dead.exitcode, "earlier")
        if not self._process.is_alive():
            self._raise_died(during)

    def _request(self, op: str, payload: Any, during: str) -> int:
        with self._lock:
            self._check_usable(during)
            rid = next(self._ids)
            try:
                send(self._conn, (op, rid, payload))
            except OSError:
                self._raise_died(during)
            self._pending.add(rid)
            return rid

    def _receive(self, wait_s: float, during: str) -> None:
        """Store at most one reply, waiting up to `wait_s`; a dead worker raises (after its last replies are in)."""
        if self._conn.poll(wait_s):
            try:
                msg, rid, payload = recv(self._conn)
            except (EOFError, OSError):
                self._raise_died(during)
            self._results[rid] = (msg, payload)
            self._pending.discard(rid)
        elif not self._process.is_alive() and not self._conn.poll(0):
            self._raise_died(during)

    def _ready(self, rid: int) -> bool:
        with self._lock:
            while rid not in self._results and self._conn.poll(0):
                self._receive(0, "while polling")
            return rid in self._results

    def _wait(self, rid: int, timeout: float | None, during: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if rid in self._results:
                    msg, payload = self._results.pop(rid)
                    if msg == "error":
                        self._raise_remote(payload)
                    return payload
                if self._closed:
                    raise RuntimeError("this RemoteRolloutEngine was closed before the request finished")
                if self._dead is not None:
                    raise RolloutWorkerDied(self._dead.pid, self._dead.exitcode, during)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"rollout request {rid} not finished within {timeout} s")
                self._receive(_POLL_S if left is None else min(_POLL_S, left), during)

    def _call(self, op: str, payload: Any, during: str) -> Any:
        return self._wait(self._request(op, payload, during), None, during)

    # ------------------------------------------------------------------------------------------- generation
    def submit(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> RolloutHandle:
        """Queue a generation (arguments as `generate`) and return at once; bad prompts raise here."""
        prompts = validate_prompts(
            prompt_ids, vocab_size=self.config.vocab_size, max_model_len=self.max_model_len, n=n,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        args = dict(
            prompt_ids=prompts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=list(stop_token_ids) if stop_token_ids is not None else None,
            seed=seed,
            **kwargs,
        )
        return RolloutHandle(self, self._request("generate", args, "while asked for a generation"))

    def generate(self, prompt_ids: list[list[int]], **kwargs: Any) -> RolloutBatch:
        """Sample completions in the worker and wait for them; arguments as `RolloutEngine.generate`."""
        return self.submit(prompt_ids, **kwargs).result()

    # ------------------------------------------------------------------------------------------- weights / memory
    def _drain(self) -> None:
        """Wait for every submitted request (their results stay with their handles)."""
        with self._lock:
            while self._pending:
                self._receive(_POLL_S, "while finishing the submitted generations")

    @torch.no_grad()
    def sync_weights(self, model: Any, version: int | None = None) -> dict[str, float]:
        """Push the trainer's weights (main model and MTP layers) to the worker's engine; the engine's version
        becomes `version` (default: the current one + 1). Waits for the submitted generations first. Returns (and
        keeps in `last_sync`) bytes, buckets and seconds."""
        check_same_config("sync_weights", model.config, self.config)
        new_version = self.version + 1 if version is None else int(version)
        return self.load_named_weights(model.named_weights(), version=new_version)

    @torch.no_grad()
    def load_named_weights(self, weights, version: int | None = None) -> dict[str, float]:
        """Push (policy checkpoint name, tensor) pairs to the worker's engine (its `load_named_weights`)."""
        new_version = self.version + 1 if version is None else int(version)
        return broadcast_weights([self], weights, new_version, wait=True)

    @torch.no_grad()
    def push_weights(self, model: Any, version: int | None = None) -> None:
        """`sync_weights` without waiting (asynchronous RL): the weights are copied now, so the caller may go on
        training; they are broadcast in the background and loaded when the worker reaches this request, after the
        generations submitted before it; those submitted after sample with them. `version`: as `sync_weights`, and
        `self.version` is the new one at once. The next push or sync waits for this one (`last_sync` then has its
        figures). The worker must reach it within `timeout_s` (the broadcast's bound)."""
        check_same_config("push_weights", model.config, self.config)
        new_version = self.version + 1 if version is None else int(version)
        broadcast_weights([self], model.named_weights(), new_version, wait=False)

    @property
    def push_buffers(self) -> list[torch.Tensor]:
        """The trainer's flattened copies of the weights that the push in flight holds until its broadcast ends."""
        return list(self._push[2]) if self._push is not None else []

    def _announce_sync(self, version: int, buckets: list, *, drain: bool, during: str) -> int:
        """The worker's half of a weight update: its request, queued after the push in flight (and, with `drain`,
        after the submitted generations' replies); the caller then broadcasts the buckets."""
        self._check_usable(during)
        self._finish_push()
        if drain:
            self._drain()
        return self._request("sync", (version, buckets), during)

    def _finish_push(self) -> None:
        """Wait for the push in flight, if any: the worker's reply (which polls its liveness), then the broadcasts."""
        if self._push is None:
            return
        rid, works, _, t0 = self._push
        self._push = None
        info = self._wait(rid, None, "while taking weights")
        for work in works:  # done once the worker replied (it received every bucket)
            work.wait()
        self.last_sync = dict(info, seconds=time.perf_counter() - t0)

    def offload(self) -> None:
        """The worker's engine `offload` (after the submitted generations)."""
        self._call("offload", None, "while offloading")

    def onload(self) -> None:
        self._call("onload", None, "while onloading")

    # ------------------------------------------------------------------------------------------- lifetime
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker and wait for it to exit (idempotent); pending handles then raise."""
        with self._lock:
            if self._closed:
                return
            if self._push is not None and self._dead is None and self._process.is_alive():
                try:  # let the worker take the weights it was sent: a broadcast left half done would block here
                    self._finish_push()
                except Exception:
                    pass
            self._closed = True
            self._finalizer.cancel()
            _shutdown(self._process, self._conn, self._tmpdir, timeout_s)
            self._group = self.weight_group = None

    def __enter__(self) -> RemoteRolloutEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_whole_group(engines: Sequence[RemoteRolloutEngine]) -> bool:
    """Whether `engines` are every worker of one weight group: a broadcast over it reaches all and only them."""
    group = engines[0].weight_group if engines else None
    return group is not None and all(e.weight_group is group for e in engines) and len(engines) == group.world_size - 1


@torch.no_grad()
def broadcast_weights(
    engines: Sequence[RemoteRolloutEngine], weights, version: int, *, wait: bool
) -> dict[str, float] | None:
    """One weight update for `engines`, the workers of one weight group (every rank but the trainer's): each is sent
    the plan over its pipe, then the buckets are broadcast once for all. `wait`: as `sync_weights` (after the
    submitted generations; returns the update's bytes, buckets and seconds, also each engine's `last_sync`), else as
    `push_weights` (the weights are copied, the broadcast runs in the background, each engine's next update waits
    for it). Every engine's version becomes `version`."""
    during = "while taking weights"
    for e in engines:
        e._check_usable(during)
    if not is_whole_group(engines):
        group = engines[0].weight_group
        raise ValueError(
            f"broadcast_weights: the weight group has {group.world_size - 1} workers, all of which take each update "
            f"together (through their RolloutPool); got {len(engines)} engines (or engines of other groups)"
        )
    with contextlib.ExitStack() as locks:
        for e in engines:
            locks.enter_context(e._lock)
        t0 = time.perf_counter()
        weights = list(weights)
        first = weights[0][1] if weights else None
        device = transport_device(engines[0].transport, first.device if first is not None and first.is_cuda else None)
        buckets = plan_buckets(weights, engines[0].bucket_bytes)
        rids = [e._announce_sync(version, buckets, drain=wait, during=during) for e in engines]
        pg = engines[0]._group
        if not wait:
            works, buffers = start_send(pg, buckets, weights, device)
            for e, rid in zip(engines, rids, strict=True):
                e._push = (rid, works, buffers, t0)
                e.version = version
            return None
        try:
            send_weights(pg, buckets, weights, device)
        except Exception as exc:
            for e in engines:
                if not e._process.is_alive():
                    e._raise_died(during)
            # a worker left waiting for the rest of the buckets has half-loaded weights: not worth keeping
            exc.add_note("the rollout workers were stopped (their weights were half loaded)")
            for e in engines:
                e.close()
            raise
        for e, rid in zip(engines, rids, strict=True):
            info = e._wait(rid, None, during)
            e.version = version
            e.last_sync = dict(info, seconds=time.perf_counter() - t0)
        return engines[0].last_sync
