"""Weights from the trainer to rollout processes over a torch.distributed process group of their own.

The group is built from a `TCPStore` the trainer hosts on a port the OS picks and a `ProcessGroupGloo` (or
`ProcessGroupNCCL`) object constructed directly, not through `init_process_group`: torch.distributed's default group
(the trainer's own world under torchrun, when it has one) is never read or replaced, and `new_group` could not span
two worlds anyway. The trainer is rank 0, rollout workers are ranks 1..n: one worker on a group of two, or every
worker of a pool on one `WeightGroup`, so that an update is flattened and broadcast once for all of them.

One push: the trainer sends the plan (`Bucket`s: dtype, size, each tensor's name and shape) over its control pipe,
then broadcasts each bucket as one flat uint8 tensor (any dtype crosses gloo and NCCL alike). The receiver yields
(name, tensor) views of each bucket as it arrives, so a loader that consumes the stream lazily holds about one
bucket at a time.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

TRANSPORTS = ("gloo", "nccl")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Bucket:
    """Tensors of one dtype sent as one broadcast of `nbytes` bytes, in order."""

    dtype: torch.dtype
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel for t in self.tensors) * torch.empty((), dtype=self.dtype).element_size()


def plan_buckets(weights: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[Bucket]:
    """Group (name, tensor) pairs, in order, into buckets of one dtype each closed once it reaches `bucket_bytes`
    (a tensor larger than that gets a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[Bucket] = []
    specs: list[TensorSpec] = []
    dtype: torch.dtype | None = None
    size = 0
    for name, t in weights:
        if specs and (t.dtype != dtype or size >= bucket_bytes):
            buckets.append(Bucket(dtype, tuple(specs)))
            specs, size = [], 0
        dtype = t.dtype
        specs.append(TensorSpec(name, tuple(t.shape)))
        size += t.numel() * t.element_size()
    if specs:
        buckets.append(Bucket(dtype, tuple(specs)))
    return buckets


# ----------------------------------------------------------------------------------------------- the group
def host_store(host: str = "127.0.0.1", timeout_s: float = 300.0) -> dist.TCPStore:
    """The trainer's store, on a free port (port 0: the OS picks, so two engines never collide); `.port` says which."""
    return dist.TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def connect_store(host: str, port: int, timeout_s: float = 300.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def make_group(
    store: dist.Store, rank: int, world_size: int, transport: str, timeout_s: float = 300.0, host: str = "127.0.0.1"
) -> dist.ProcessGroup:
    """A process group object over `store`, outside torch.distributed's default world; blocks until every rank has
    joined (gloo) or the first collective (NCCL). `timeout_s` bounds each collective."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if transport == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # bound to `host` explicitly: the default device resolves the machine's hostname, which a container may lack
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if transport == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")


class IncompleteGroup(TimeoutError):
    """Not every worker joined a `WeightGroup` in time: one that did not start raised its own error elsewhere."""


class WeightGroup:
    """The trainer's end (rank 0) of a weight-broadcast group of `world_size` processes: the store the workers
    (ranks 1..world_size - 1) connect to, and the group itself, built by the first `join` once every rank is in."""

    def __init__(self, world_size: int, timeout_s: float = 300.0) -> None:
        if world_size < 2:
            raise ValueError(f"a weight group needs the trainer and at least one worker, got world_size={world_size}")
        self.world_size = int(world_size)
        self.timeout_s = float(timeout_s)
        self.store = host_store(timeout_s=timeout_s)
        self.transport: str | None = None
        self._group: dist.ProcessGroup | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.store.port

    def join(self, transport: str, host: str = "127.0.0.1") -> dist.ProcessGroup:
        """Rank 0's group, built on the first call (it blocks until every worker has joined, for gloo); later calls,
        from the other workers' start-ups, return the same one."""
        with self._lock:
            if self._group is None:
                try:
                    self._group = make_group(self.store, 0, self.world_size, transport, self.timeout_s, host)
                except RuntimeError as exc:  # gloo's rendezvous timed out waiting for a rank
                    raise IncompleteGroup(
                        f"not all {self.world_size - 1} rollout workers joined the weight group within "
                        f"{self.timeout_s:.0f} s (a worker that did not start says why)"
                    ) from exc
                self.transport = transport
            elif transport != self.transport:
                raise ValueError(f"the weight group uses {self.transport!r}, a worker asked for {transport!r}")
            return self._group


def transport_device(transport: str, device: torch.device | str | None = None) -> torch.device:
    """Where a bucket lives while it crosses the group: host memory for gloo, the CUDA device for NCCL."""
    if transport == "nccl":
        d = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if d.type != "cuda":
            raise ValueError(f"transport 'nccl' needs a CUDA device, got {d}")
        return d
    return torch.device("cpu")


def _broadcast(group: dist.ProcessGroup, buf: torch.Tensor) -> dist.Work:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([buf], opts)


# ----------------------------------------------------------------------------------------------- send / receive
@torch.no_grad()
def send_weights(
    group: dist.ProcessGroup,
    buckets: Sequence[Bucket],
    weights: Sequence[tuple[str, torch.Tensor]],
    device: torch.device,
) -> int:
    """Rank 0: broadcast `weights` (the sequence `buckets` was planned from) bucket by bucket; the next bucket is
    flattened while the previous one is on the wire. Returns the bytes sent."""
    it = iter(weights)
    pending: dist.Work | None = None
    total = 0
    for bucket in buckets:
        parts = []
        for spec in bucket.tensors:
            name, t = next(it)
            if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != bucket.dtype:
                raise ValueError(f"send_weights: tensor {name!r} does not match the plan ({spec}, {bucket.dtype})")
            parts.append(t.detach().to(device).reshape(-1).view(torch.uint8))
        flat = torch.cat(parts)
        work = _broadcast(group, flat)
        if pending is not None:
            pending.wait()
        pending = work
        total += flat.numel()
    if pending is not None:
        pending.wait()
    return total


@torch.no_grad()
def start_send(
    group: dist.ProcessGroup,
    buckets: Sequence[Bucket],
    weights: Sequence[tuple[str, torch.Tensor]],
    device: torch.device,
) -> tuple[list[dist.Work], list[torch.Tensor]]:
    """Rank 0, without waiting: flatten every bucket now (a copy: the caller may change `weights` at once) and start
    its broadcast. Returns the pending works and the buffers, which must stay alive until the works are done."""
    it = iter(weights)
    flats = []
    for bucket in buckets:
        parts = []
        for spec in bucket.tensors:
            name, t = next(it)
            if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != bucket.dtype:
                raise ValueError(f"start_send: tensor {name!r} does not match the plan ({spec}, {bucket.dtype})")
            parts.append(t.detach().to(device).reshape(-1).view(torch.uint8))
        flats.append(torch.cat(parts))
    return [_broadcast(group, flat) for flat in flats], flats


def receive_weights(
    group: dist.ProcessGroup, buckets: Sequence[Bucket], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks >= 1: (name, tensor) of each planned tensor, received a bucket at a time into fresh memory (a loader
    may keep references to earlier tensors). Exhaust the iterator even when loading fails: the trainer broadcasts
    every bucket regardless."""
    for bucket in buckets:
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        _broadcast(group, buf).wait()
        flat = buf.view(bucket.dtype)
        offset = 0
        for spec in bucket.tensors:
            yield spec.name, flat[offset : offset + spec.numel].view(spec.shape)
            offset += spec.numel
