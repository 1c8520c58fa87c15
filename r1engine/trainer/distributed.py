"""The few collective operations the trainer needs when it runs on several ranks (one process per rank, started
by `torchrun`, the `deepspeed` launcher or `r1engine train --nproc N`); each is a no-op in a single process.

Ranks are data-parallel: each generates, scores and trains on its share of the prompts; DeepSpeed averages the
gradients. What must agree across ranks is made to agree here: start weights, data position, metrics.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    returns (rank, world_size), (0, 1) when not launched on several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import deepspeed

        # DeepSpeed (0.19) still calls the deprecated collective names, once per ZeRO step and rank.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*deprecated", category=FutureWarning)

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world_size()


def training_device(name: str = "auto") -> torch.device:
    """The device this rank trains on: `name`, or for "auto" this rank's local GPU (LOCAL_RANK) when CUDA is
    available, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s, in place."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def reduce_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Per-step metrics of all ranks: the mean over ranks, the max for `*_max` keys. Every rank must pass the same
    keys; None and non-finite values are ignored by the mean (a metric missing on some ranks averages the rest)."""
    if not is_distributed():
        return record
    keys = sorted(k for k, v in record.items() if v is None or isinstance(v, int | float) or torch.is_tensor(v))
    values = [float(record[k]) if record[k] is not None else math.nan for k in keys]
    finite = torch.tensor([v if math.isfinite(v) else 0.0 for v in values], dtype=torch.float64)
    count = torch.tensor([1.0 if math.isfinite(v) else 0.0 for v in values], dtype=torch.float64)
    peak = torch.tensor([v if math.isfinite(v) else -math.inf for v in values], dtype=torch.float64)
    dist.all_reduce(finite)
    dist.all_reduce(count)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    out = dict(record)
    for i, k in enumerate(keys):
        if count[i] == 0:
            out[k] = None
        elif k.endswith("_max"):
            out[k] = float(peak[i])
        else:
            out[k] = float(finite[i] / count[i])
    return out
