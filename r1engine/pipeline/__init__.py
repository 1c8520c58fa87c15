"""DualPipe-style pipeline parallelism: schedule generator, simulator and a torch.distributed executor.

schedule    build_schedule(kind, num_ranks, num_microbatches) -> Schedule (per-rank F/B/W/F&B/SEND/RECV ops)
simulator   simulate(schedule, Costs(...)) -> SimResult (makespan, bubble, peak activations; checks deps)
executor    PipelineExecutor(modules, schedule, ...).step(inputs, labels, criterion) over torch.distributed
weight_grad WeightGradStore and DeferrableLinear (B computes input grads now, W the weight grads later)
"""

from __future__ import annotations

from r1engine.pipeline.executor import PipelineExecutor, StepResult
from r1engine.pipeline.schedule import SCHEDULE_KINDS, Op, OpKind, Schedule, build_schedule, validate_schedule_args
from r1engine.pipeline.simulator import Costs, SimResult, published_bubble, simulate
from r1engine.pipeline.weight_grad import DeferrableLinear, WeightGradStore, deferrable_linear

__all__ = [
    "SCHEDULE_KINDS",
    "Costs",
    "DeferrableLinear",
    "Op",
    "OpKind",
    "PipelineExecutor",
    "Schedule",
    "SimResult",
    "StepResult",
    "WeightGradStore",
    "build_schedule",
    "deferrable_linear",
    "published_bubble",
    "simulate",
    "validate_schedule_args",
]
