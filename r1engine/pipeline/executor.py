"""Run a model split into pipeline stages on a generated schedule over torch.distributed.

Every process is one pipeline rank and holds `schedule.modules_per_rank` stage modules (DualPipe: stages r
and P-1-r; DualPipeV: stages r and 2P-1-r; 1F1B/ZB1P: stage r). `PipelineExecutor.step` walks the rank's op
list: SEND is `dist.isend`, RECV posts `dist.irecv` (tag = per-pair sequence number, so gloo's tag matching
and NCCL's FIFO order pair the same messages), a compute op waits for its received input, F runs the stage
(and the criterion on the last stage), B runs autograd from the stage output with the received gradient
(collecting weight-gradient closures in `WeightGradStore` when the schedule defers W), W runs them, and F&B
calls the modules' `overlapped_forward_backward` hook when they define one (both modules of the same class;
`type(m).overlapped_forward_backward(module_f, x_f, module_b, outputs_b, grads_b) -> y_f` must compute
module_f(x_f) and `torch.autograd.backward(outputs_b, grads_b)`, interleaving them as it likes; the
executor applies the criterion to y_f afterwards if it is a last stage; without the hook F then B run one
after the other). Activations and gradients
between ranks have one fixed shape and dtype (`p2p_shape`, `p2p_dtype`), e.g. packed fixed-length chunks.

Gradients are summed over micro-batches (one backward per micro-batch loss, no 1/M scaling: scale inside the
criterion). With DualPipe each stage exists on two ranks; after a training step the two copies' gradients
are summed (`sum_mirrored_grads=True`), so both ranks hold the full gradient of that stage. Under
`torch.no_grad()` the step runs forwards only (inference) and returns the last-stage outputs and losses.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from r1engine.pipeline.schedule import Op, OpKind, Schedule, build_schedule, validate_schedule_args
from r1engine.pipeline.weight_grad import WeightGradStore

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """Per-micro-batch results available on this rank (the ranks that run a last stage)."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # mb -> detached scalar loss
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # mb -> detached last-stage output
    deferred_weight_grads: int = 0  # weight-gradient closures run at W ops (0 if nothing was deferred)

    def loss_tensor(self) -> torch.Tensor | None:
        """Losses of this rank stacked in micro-batch order, or None if it computes none."""
        return torch.stack([self.losses[k] for k in sorted(self.losses)]) if self.losses else None


class PipelineExecutor:
    """Executes pipeline schedules for the local stage `modules` of this rank.

    modules: the rank's stages by slot (DualPipe/DualPipeV: 2, others: 1). kind: 'dualpipe', 'dualpipev',
    '1f1b' or 'zb1p'. p2p_shape / p2p_dtype: shape and dtype of every tensor passed between stages.
    group: the pipeline process group (default WORLD); pipeline rank = rank in that group.
    zero_bubble: let DualPipe/DualPipeV defer W as DeepSeek's schedule does.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        kind: str,
        *,
        p2p_shape: Sequence[int],
        p2p_dtype: torch.dtype = torch.float32,
        group: dist.ProcessGroup | None = None,
        zero_bubble: bool = True,
        sum_mirrored_grads: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("PipelineExecutor needs torch.distributed to be initialized (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.kind = kind
        validate_schedule_args(kind, self.num_ranks, 2 * self.num_ranks)
        want = 2 if kind in ("dualpipe", "dualpipev") else 1
        if len(modules) != want:
            raise ValueError(f"{kind} needs {want} stage module(s) per rank (modules), got {len(modules)}")
        self.modules = list(modules)
        self.p2p_shape = tuple(int(s) for s in p2p_shape)
        self.p2p_dtype = p2p_dtype
        self.zero_bubble = zero_bubble
        self.sum_mirrored_grads = sum_mirrored_grads
        if device is None:
            params = [p for m in self.modules for p in m.parameters()]
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)

    @functools.cache  # noqa: B019  (a handful of micro-batch counts per executor)
    def schedule(self, num_microbatches: int) -> Schedule:
        """The schedule used for `num_microbatches` (cached)."""
        return build_schedule(self.kind, self.num_ranks, num_microbatches, self.zero_bubble)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # ------------------------------------------------------------------ step
    def step(
        self,
        inputs: Sequence[torch.Tensor] | None,
        labels: Sequence[torch.Tensor] | None = None,
        criterion: Criterion | None = None,
        *,
        num_microbatches: int | None = None,
        return_outputs: bool = False,
    ) -> StepResult:
        """Run one pipeline step over all micro-batches.

        inputs / labels: one tensor per micro-batch, indexed by micro-batch id (every rank may pass the full
        lists; a rank reads only the micro-batches whose first / last stage it runs; ranks that run neither may
        pass None with num_microbatches). DualPipe feeds micro-batches 0..M/2-1 at rank 0 and M/2..M-1 at rank
        P-1. criterion(output, label) -> scalar loss, required for training on ranks that run a last stage.
        Training if autograd is enabled, forward-only under torch.no_grad().
        """
        m = num_microbatches if num_microbatches is not None else len(inputs if inputs is not None else labels or [])
        if inputs is not None and len(inputs) != m:
            raise ValueError(f"inputs must have num_microbatches = {m} tensors, got {len(inputs)}")
        validate_schedule_args(self.kind, self.num_ranks, m)
        sched = self.schedule(m)
        training = torch.is_grad_enabled()
        run = _StepRun(self, sched, inputs, labels, criterion, training, return_outputs)
        try:
            run.execute()
        finally:
            run.wait_sends()
        if training and self.kind == "dualpipe" and self.sum_mirrored_grads:
            self.sum_dualpipe_mirrored_grads()
        return run.result

    def sum_dualpipe_mirrored_grads(self) -> None:
        """Sum the gradients of the two copies of each DualPipe stage (rank r slot 0 = rank P-1-r slot 1).

        Both copies end with the same bits (a + b == b + a), as if one module had seen all micro-batches.
        """
        if self.kind != "dualpipe":
            raise ValueError(f"mirrored stage copies exist only for kind='dualpipe', not {self.kind!r}")
        p0 = list(self.modules[0].parameters())
        p1 = list(self.modules[1].parameters())
        for p in p0 + p1:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        mine = torch.cat([p.grad.reshape(-1) for p in p0 + p1])
        other = torch.empty_like(mine)
        peer = self._global(self.num_ranks - 1 - self.rank)
        reqs = [dist.isend(mine, peer, group=self.group, tag=0), dist.irecv(other, peer, group=self.group, tag=0)]
        for req in reqs:
            req.wait()
        n0 = sum(p.numel() for p in p0)
        peer_slot1 = other[n0:]
        peer_slot0 = other[:n0]
        # my slot 0 (stage r) mirrors the peer's slot 1 (stage P-1-(P-1-r) = r), and the other way round.
        offset = 0
        for p in p0:
            p.grad += peer_slot1[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        offset = 0
        for p in p1:
            p.grad += peer_slot0[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


class _StepRun:
    """State of one step on one rank (tensors in flight, pending weight gradients)."""

    def __init__(
        self,
        ex: PipelineExecutor,
        sched: Schedule,
        inputs: Sequence[torch.Tensor] | None,
        labels: Sequence[torch.Tensor] | None,
        criterion: Criterion | None,
        training: bool,
        return_outputs: bool,
    ) -> None:
        self.ex = ex
        self.s = sched
        self.inputs = inputs
        self.labels = labels
        self.criterion = criterion
        self.training = training
        self.return_outputs = return_outputs
        self.result = StepResult()
        self.last = sched.num_stages - 1
        self.x_in: dict[tuple[int, int], torch.Tensor] = {}  # stage input (leaf that collects the input grad)
        self.y_out: dict[tuple[int, int], torch.Tensor] = {}  # stage output (graph root for B)
        self.loss: dict[int, torch.Tensor] = {}  # mb -> loss with graph
        self.grad_in: dict[tuple[int, int], torch.Tensor] = {}  # input gradient of (mb, stage)
        self.recvs: dict[tuple[int, int, bool], tuple[dist.Work, torch.Tensor]] = {}
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.w_pending: dict[tuple[int, int], list[Callable[[], None]]] = {}
        self.needs_labels = training or criterion is not None

    # ------------------------------------------------------------ driver
    def execute(self) -> None:
        ex = self.ex
        if self.training and self.criterion is None:
            if any(self.s.rank_of(mb, self.last) == ex.rank for mb in range(self.s.num_microbatches)):
                raise ValueError(f"criterion is required for a training step on rank {ex.rank} (it runs last stages)")
        for op in self.s.ops[ex.rank]:
            k = op.kind
            if k == OpKind.SEND:
                if op.grad and not self.training:
                    continue
                t = self.grad_in.pop((op.mb, op.stage)) if op.grad else self.y_out[(op.mb, op.stage)].detach()
                if not self.training:
                    self.y_out.pop((op.mb, op.stage))
                t = t.contiguous()
                work = dist.isend(t, ex._global(op.peer), group=ex.group, tag=op.tag)
                self.sends.append((work, t))
            elif k == OpKind.RECV:
                if op.grad and not self.training:
                    continue
                buf = torch.empty(ex.p2p_shape, dtype=ex.p2p_dtype, device=ex.device)
                work = dist.irecv(buf, ex._global(op.peer), group=ex.group, tag=op.tag)
                self.recvs[(op.mb, op.stage, op.grad)] = (work, buf)
            elif k == OpKind.F:
                x = self._input(op.mb, op.stage)
                self._finish_forward(op, x, ex.modules[op.slot](x))
            elif k == OpKind.B:
                if self.training:
                    self._backward(op)
            elif k == OpKind.W:
                if self.training:
                    for fn in self.w_pending.pop((op.mb, op.stage)):
                        fn()
                        self.result.deferred_weight_grads += 1
            elif k == OpKind.FB:
                self._forward_backward(op)
        if self.training and (self.w_pending or self.recvs or self.grad_in):
            raise RuntimeError(f"pipeline step ended with unconsumed state on rank {ex.rank}")

    def wait_sends(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    # ------------------------------------------------------------ forward
    def _input(self, mb: int, stage: int) -> torch.Tensor:
        if stage == 0:
            if self.inputs is None:
                raise ValueError(f"inputs are required on rank {self.ex.rank}: it runs stage 0 of micro-batch {mb}")
            return self.inputs[mb].to(self.ex.device)
        if self.s.rank_of(mb, stage - 1) == self.ex.rank:  # DualPipeV turn: the previous stage is local
            x = self.y_out[(mb, stage - 1)].detach()
            if not self.training:
                self.y_out.pop((mb, stage - 1))
        else:
            work, x = self.recvs.pop((mb, stage - 1, False))
            work.wait()
        if self.training:
            x.requires_grad_(True)
            self.x_in[(mb, stage)] = x
        return x

    def _finish_forward(self, op: Op, x: torch.Tensor, y: torch.Tensor) -> None:
        mb, stage = op.mb, op.stage
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"stage {stage} must return one tensor, got {type(y).__name__}")
        if y is x or y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError(
                f"stage {stage} (micro-batch {mb}) returned its input or a view of it; pipeline stages must return "
                "a tensor with its own storage (e.g. x.clone() instead of x.view(...)), since received buffers and "
                "sent outputs are owned by the executor"
            )
        if stage < self.last:
            if tuple(y.shape) != self.ex.p2p_shape or y.dtype != self.ex.p2p_dtype:
                raise ValueError(
                    f"stage {stage} output (micro-batch {mb}) must have the fixed p2p shape {self.ex.p2p_shape} and "
                    f"dtype {self.ex.p2p_dtype}, got {tuple(y.shape)} {y.dtype}"
                )
            self.y_out[(mb, stage)] = y
            return
        if self.return_outputs:
            self.result.outputs[mb] = y.detach()
        if self.criterion is not None:
            if self.labels is None:
                raise ValueError(
                    f"labels are required on rank {self.ex.rank}: it computes the loss of micro-batch {mb}"
                )
            loss = self.criterion(y, self.labels[mb].to(self.ex.device))
            if self.training:
                self.loss[mb] = loss
            self.result.losses[mb] = loss.detach()

    # ------------------------------------------------------------ backward
    def _backward_args(self, mb: int, stage: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if stage == self.last:
            return self.loss.pop(mb), None
        y = self.y_out.pop((mb, stage))
        if self.s.rank_of(mb, stage + 1) == self.ex.rank:
            g = self.grad_in.pop((mb, stage + 1))
        else:
            work, g = self.recvs.pop((mb, stage + 1, True))
            work.wait()
        return y, g

    def _after_backward(self, mb: int, stage: int, queue: list[Callable[[], None]] | None) -> None:
        x = self.x_in.pop((mb, stage), None)
        if stage > 0:
            if x is None or x.grad is None:
                raise RuntimeError(f"stage {stage} (micro-batch {mb}) produced no gradient for its input")
            self.grad_in[(mb, stage)] = x.grad
        if queue is not None:
            self.w_pending[(mb, stage)] = queue

    def _backward(self, op: Op) -> None:
        y, g = self._backward_args(op.mb, op.stage)
        ctx = WeightGradStore.deferring() if op.defer_w else contextlib.nullcontext(None)
        with ctx as queue:
            torch.autograd.backward(y, g)
        self._after_backward(op.mb, op.stage, queue)

    def _forward_backward(self, op: Op) -> None:
        if not self.training:
            x = self._input(op.mb, op.stage)
            self._finish_forward(op, x, self.ex.modules[op.slot](x))
            return
        x = self._input(op.mb, op.stage)
        yb, gb = self._backward_args(op.mb2, op.stage2)
        mf, mb_ = self.ex.modules[op.slot], self.ex.modules[op.slot2]
        hook = getattr(type(mf), "overlapped_forward_backward", None) if type(mf) is type(mb_) else None
        ctx = WeightGradStore.deferring() if op.defer_w else contextlib.nullcontext(None)
        with ctx as queue:
            if hook is not None:
                y = hook(mf, x, mb_, yb, gb)
            else:
                y = mf(x)
                torch.autograd.backward(yb, gb)
        self._finish_forward(op, x, y)
        self._after_backward(op.mb2, op.stage2, queue)
