"""The rollout worker process behind `RemoteRolloutEngine`: builds a real engine with `create_engine` from a model
directory, then serves requests from its control pipe one at a time, in order; the one exception is a weight sync
that arrives during a partial rollout (a generation submitted with `segment_tokens`, `r1engine.rollout.partial`):
it is loaded at the generation's next segment boundary, ahead of the generations queued behind it.

Wire format: every message is a pickled tuple sent with `send_bytes` (plain pickle, not multiprocessing's, which
would move tensors through shared-memory file descriptors one by one). Trainer -> worker: (op, request id,
payload), op in generate / sync / offload / onload / close. Worker -> trainer: ("hello", pid, None) once started,
("ready", "start", info) once the engine is built, then ("done", id, result) or ("error", id, (exception,
traceback text)) per request. A `RolloutBatch` travels packed (`pack_batch`): its per-completion tensors
concatenated, so a batch of thousands of completions is a few large pickles, not thousands of small ones.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from r1engine.rollout.base import RolloutBatch
from r1engine.rollout.partial import generate_in_segments
from r1engine.rollout.weight_transfer import connect_store, make_group, receive_weights, transport_device


@dataclass
class WorkerSpec:
    """What the worker needs to start (pickled to the spawned process)."""

    backend: str
    model_dir: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    store_host: str = "127.0.0.1"
    store_port: int = 0
    rank: int = 1
    world_size: int = 2
    transport: str = "gloo"
    device: str | None = None
    timeout_s: float = 300.0
    num_threads: int | None = None
    device_host: str | None = None  # this side's address for the group's device (None: store_host)
    watch_parent: bool = True  # a spawned worker exits with its parent; an external one when its connection closes


def send(conn, msg: tuple) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())


def pack_batch(batch: RolloutBatch) -> dict[str, Any]:
    lengths = [len(x) for x in batch.logprobs]
    return {
        "prompt_index": batch.prompt_index,
        "completion_ids": batch.completion_ids,
        "lengths": lengths,
        "logprobs": torch.cat(batch.logprobs) if lengths else torch.zeros(0),
        "versions": torch.cat(batch.versions) if batch.versions else None,
        "finish_reason": batch.finish_reason,
        "stats": batch.stats,
        "prompt_ids": batch.prompt_ids,
    }


def unpack_batch(packed: dict[str, Any]) -> RolloutBatch:
    lengths = packed["lengths"]
    versions = packed["versions"]
    return RolloutBatch(
        prompt_index=packed["prompt_index"],
        completion_ids=packed["completion_ids"],
        logprobs=list(packed["logprobs"].split(lengths)),
        finish_reason=packed["finish_reason"],
        stats=packed["stats"],
        prompt_ids=packed["prompt_ids"],
        versions=list(versions.split(lengths)) if versions is not None else [],
    )


def _error_payload(exc: BaseException) -> tuple[BaseException, str]:
    """The exception itself when it pickles (so the trainer can catch a ValueError as one), else a RuntimeError."""
    tb = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, tb


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its trainer (killed with -9, no atexit ran): once reparented, exit. Polling the
    parent pid works from any thread of the trainer, unlike PR_SET_PDEATHSIG (tied to the spawning thread)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="r1engine-parent-watch", daemon=True).start()


def _engine_info(engine: Any) -> dict[str, Any]:
    return {
        "backend": engine.backend,
        "num_speculative_tokens": engine.num_speculative_tokens,
        "max_model_len": engine.max_model_len,
        "config": engine.config,
        "version": engine.version,
    }


def _sync(engine: Any, group, payload, device: torch.device) -> dict[str, float]:
    version, buckets = payload
    t0 = time.perf_counter()
    stream = receive_weights(group, buckets, device)
    try:
        engine.load_named_weights(stream)
    finally:
        for _ in stream:  # the trainer broadcasts every bucket: take them all even when loading failed
            pass
    engine.version = int(version)
    return {
        "bytes": float(sum(b.nbytes for b in buckets)),
        "buckets": float(len(buckets)),
        "worker_seconds": time.perf_counter() - t0,
    }


def worker_main(conn, spec: WorkerSpec) -> None:
    """Entry point of the spawned process."""
    if spec.watch_parent:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the trainer shuts us down
        _exit_with_parent(os.getppid())
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    if spec.device is not None and torch.device(spec.device).type == "cuda":
        torch.cuda.set_device(torch.device(spec.device))
    send(conn, ("hello", os.getpid(), None))
    store = connect_store(spec.store_host, spec.store_port, spec.timeout_s)
    group = make_group(
        store, spec.rank, spec.world_size, spec.transport, spec.timeout_s, spec.device_host or spec.store_host
    )
    device = transport_device(spec.transport, spec.device)
    try:
        from r1engine.rollout import create_engine

        if not os.path.isfile(os.path.join(spec.model_dir, "config.json")):
            raise FileNotFoundError(
                f"the rollout worker has no model directory {spec.model_dir} (no config.json there): start it with "
                "--model-dir, a copy of the trainer's checkpoint on its machine (the trainer's weights replace it)"
            )

        kwargs = dict(spec.engine_kwargs)
        if spec.device is not None and spec.backend != "vllm":  # "auto" drops it if it picks vLLM
            kwargs["device"] = spec.device
        engine = create_engine(spec.backend, model_dir=spec.model_dir, **kwargs)
        if not hasattr(engine, "load_named_weights"):
            raise TypeError(f"the {engine.backend} engine has no load_named_weights: it cannot take weights remotely")
    except Exception as exc:
        send(conn, ("error", "start", _error_payload(exc)))
        return
    send(conn, ("ready", "start", _engine_info(engine)))

    backlog: deque[tuple] = deque()  # requests read ahead of their turn while a partial rollout ran

    def serve(op: str, rid: Any, payload: Any) -> None:
        try:
            result = ops[op](payload)
        except Exception as exc:
            send(conn, ("error", rid, _error_payload(exc)))
        else:
            send(conn, ("done", rid, result))

    def take_weights_in_flight() -> None:
        """Between two segments of a partial rollout: load the weights that arrived meanwhile. A sync overtakes the
        generations queued before it (they then sample with newer weights, and their tokens say so), never another
        kind of request."""
        while conn.poll(0):
            backlog.append(recv(conn))
        overtaken = []
        while backlog and backlog[0][0] in ("sync", "generate"):
            msg = backlog.popleft()
            if msg[0] == "sync":
                serve(*msg)
            else:
                overtaken.append(msg)
        backlog.extendleft(reversed(overtaken))

    def generate(kw: dict[str, Any]) -> dict[str, Any]:
        segment_tokens = kw.pop("segment_tokens", None)
        if segment_tokens:
            return pack_batch(
                generate_in_segments(engine, segment_tokens=segment_tokens, between=take_weights_in_flight, **kw)
            )
        return pack_batch(engine.generate(**kw))

    ops = {
        "generate": generate,
        "sync": lambda payload: _sync(engine, group, payload, device),
        "offload": lambda _: engine.offload(),
        "onload": lambda _: engine.onload(),
    }
    while True:
        try:
            op, rid, payload = backlog.popleft() if backlog else recv(conn)
            if op == "close":
                send(conn, ("done", rid, None))
                return
            serve(op, rid, payload)
        except (EOFError, OSError):  # the trainer closed its end (or died): nothing left to serve
            return
