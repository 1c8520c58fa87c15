"""Rollout workers started elsewhere: on another machine, or by a launcher, instead of spawned by the trainer.

The trainer listens on `rollout.listen` (host:port) and the worker connects to it (`r1engine rollout-worker --connect
host:port`); from there on the worker is the one `RemoteRolloutEngine` spawns (`r1engine.rollout.remote_worker`):
the same requests over the connection (a TCP socket instead of a pipe), the same weight broadcasts over a gloo (or
NCCL) group of the two processes' own, each side's group device bound to the address the connection uses.

The start: the worker connects (retrying until the trainer listens, so the two may be launched in any order), both
sides prove they hold the same key (multiprocessing's HMAC challenge: what crosses the connection is pickled, so
nobody else may connect), the trainer sends the `WorkerSpec`, the worker builds its engine from its own copy of the
checkpoint (`--model-dir`; by default the directory the trainer wrote its model to, which another machine sees only
on a shared file system), and the trainer pushes its current weights at once. The key is R1ENGINE_ROLLOUT_AUTHKEY
on both machines; without it only loopback addresses may be used.

A worker that dies closes its connection: the trainer raises `RolloutWorkerDied` at its next wait, as for a spawned
worker (the exit code is unknown from afar). A worker whose trainer is gone exits when its connection closes.
"""

from __future__ import annotations

import os
import socket
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

AUTHKEY_ENV = "R1ENGINE_ROLLOUT_AUTHKEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LOCAL_KEY = b"r1engine-rollout-loopback"


def parse_address(address: str, what: str = "address") -> tuple[str, int]:
    """'host:port' (an IPv6 host in brackets) -> (host, port); a ValueError names `what` and the value."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected host:port with a port in 1..65535, got {address!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """(host, port) -> 'host:port', an IPv6 host in brackets (what `parse_address` reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def authkey(host: str) -> bytes:
    """The shared key: R1ENGINE_ROLLOUT_AUTHKEY, required for any address but a loopback one."""
    key = os.environ.get(AUTHKEY_ENV)
    if key:
        return key.encode()
    if host in _LOOPBACK:
        return _LOCAL_KEY
    raise ValueError(
        f"rollout worker address {host!r} is not a loopback address: set {AUTHKEY_ENV} to the same secret on the "
        "trainer's and the worker's machines (the connection carries pickled data)"
    )


class ExternalWorker:
    """The trainer's handle on a connected worker, standing in for a spawned worker's `multiprocessing.Process`:
    nothing can be joined or signalled from afar, so liveness is the connection's (EOF when the worker is gone)."""

    exitcode = None

    def __init__(self, conn: Connection, pid: int, host: str, local_host: str) -> None:
        self.conn, self.pid, self.host, self.local_host = conn, pid, host, local_host

    def is_alive(self) -> bool:
        return not self.conn.closed

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass

    kill = terminate

    @classmethod
    def accept(cls, address: str, timeout_s: float) -> ExternalWorker:
        """Listen on `address` until one worker connects and authenticates (TimeoutError after `timeout_s`)."""
        host, port = parse_address(address, "rollout.listen")
        key = authkey(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family) as server:
            server.settimeout(timeout_s)
            try:
                sock, peer_address = server.accept()
            except TimeoutError:
                raise TimeoutError(
                    f"no rollout worker connected to {address} within {timeout_s:.0f} s (start one with "
                    f"`r1engine rollout-worker --connect <this machine's address>:{port}`)"
                ) from None
        sock.settimeout(None)
        peer, local_host = peer_address[0], sock.getsockname()[0]  # (host, port[, flow, scope]) for IPv4 and IPv6
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
            hello = conn.recv()
        except Exception as exc:
            conn.close()
            raise ConnectionError(
                f"rollout worker at {peer} failed the handshake ({exc}): is its {AUTHKEY_ENV} the same?"
            ) from None
        return cls(conn, int(hello["pid"]), peer, local_host)


def connect(address: str, timeout_s: float) -> tuple[Connection, str]:
    """The worker's side: connect to the trainer at `address`, retrying until it listens; returns the authenticated
    connection and this machine's address on it."""
    host, port = parse_address(address, "--connect")
    key = authkey(host)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)  # IPv4, IPv6 or a host name
            break
        except (TimeoutError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no trainer listening on {address} within {timeout_s:.0f} s") from None
            time.sleep(0.5)
    sock.settimeout(None)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except (AuthenticationError, EOFError, ConnectionResetError):
        conn.close()
        raise ConnectionError(
            f"the trainer at {address} refused this worker's key: {AUTHKEY_ENV} must be the same on both sides"
        ) from None
    conn.send({"pid": os.getpid(), "host": socket.gethostname()})
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        local_host = sock.getsockname()[0]
    return conn, local_host


def serve(address: str, *, model_dir: str | None, device: str | None, num_threads: int | None,
          timeout_s: float) -> None:  # fmt: skip
    """`r1engine rollout-worker`: connect, take the trainer's spec, run the worker until the trainer closes."""
    from r1engine.rollout.remote_worker import recv, worker_main

    conn, local_host = connect(address, timeout_s)
    kind, _, spec = recv(conn)
    if kind != "spec":
        raise RuntimeError(f"rollout worker protocol: expected the trainer's spec, got {kind!r}")
    host, _ = parse_address(address, "--connect")
    spec.store_host, spec.device_host, spec.watch_parent = host, local_host, False
    if model_dir is not None:
        spec.model_dir = model_dir
    if device is not None:
        spec.device = device
    if num_threads is not None:
        spec.num_threads = num_threads
    worker_main(conn, spec)
