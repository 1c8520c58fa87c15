"""End-to-end tests of the pipeline executor: real gloo processes (torch.multiprocessing spawn) on CPU.

Every schedule runs a small fp32 model split into stages against the same model unpartitioned in the same
process (one backward per micro-batch loss, as the executor does). Asserted, per rank:
  * every loss the rank computes is bitwise equal to the reference loss of that micro-batch, and every
    micro-batch's loss is computed on exactly one rank;
  * every local stage's parameter gradients match the reference: DeepSeek's metric
    1 - 2*sum(x*y) / sum(x*x + y*y) < 1e-12 and relative L2 error < 1e-5, both in float64 (fp32 sums in a
    different order cannot do better); in a float64 run the relative L2 error is < 1e-12; in a bf16 run
    (losses and outputs still bitwise equal) the relative L2 error is < 2e-2;
  * every W op runs the deferred weight gradients of its chunk (ZB1P and multi-rank DualPipe(V) defer some);
  * DualPipe: both copies of each stage hold bitwise identical, summed gradients;
  * the overlapped_forward_backward hook is called for every F&B slot;
  * a forward-only step under torch.no_grad() returns outputs and losses bitwise equal to the reference.
Packed integer token chunks feed the first stage (1-rank DualPipeV, losses bitwise equal). Bad stage outputs
(wrong shape, a view of the input) raise ValueError naming the constraint.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from r1engine import _ext
from r1engine.pipeline import DeferrableLinear, PipelineExecutor, build_schedule

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not _ext.has_op("pipeline_schedule"), reason="compiled extension not built"),
]

SHAPE = (3, 5, 12)  # micro-batch x sequence x hidden: the fixed p2p shape


class Stage(nn.Module):
    """A residual MLP block with deferrable linears and one non-deferrable LayerNorm."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = DeferrableLinear(hidden, 2 * hidden)
        self.down = DeferrableLinear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class HookStage(Stage):
    """Stage whose class provides the overlapped F&B hook (runs them one after the other and counts calls)."""

    calls = 0

    @staticmethod
    def overlapped_forward_backward(module_f, x_f, module_b, outputs_b, grads_b):
        HookStage.calls += 1
        y = module_f(x_f)
        torch.autograd.backward(outputs_b, grads_b)
        return y


class WrongShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SHAPE[-1], SHAPE[-1] + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class ReturnsView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(SHAPE[-1], SHAPE[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(SHAPE)


def _criterion(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, t)


def _cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm())


def _run_case(
    group: dist.ProcessGroup | None, kind: str, m: int, dtype: torch.dtype, zero_bubble: bool, hook: bool
) -> None:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sched = build_schedule(kind, world, m, zero_bubble)
    torch.manual_seed(1000 + m)
    cls = HookStage if hook else Stage
    stages = [cls(SHAPE[-1]).to(dtype) for _ in range(sched.num_stages)]
    inputs = [torch.randn(SHAPE, dtype=dtype) for _ in range(m)]
    labels = [torch.randn(SHAPE, dtype=dtype) for _ in range(m)]

    ref = copy.deepcopy(stages)
    ref_losses, ref_outputs = [], []
    for x, t in zip(inputs, labels, strict=True):
        y = x
        for st in ref:
            y = st(y)
        loss = _criterion(y, t)
        loss.backward()
        ref_losses.append(loss.detach())
        ref_outputs.append(y.detach())

    local = [copy.deepcopy(stages[sched.stage_of_slot(rank, slot)]) for slot in range(sched.modules_per_rank)]
    ex = PipelineExecutor(local, kind, p2p_shape=SHAPE, p2p_dtype=dtype, zero_bubble=zero_bubble, group=group)
    HookStage.calls = 0
    # Ranks that run neither a first nor a last stage get no data at all (1F1B / ZB1P middle ranks).
    ends = {sched.rank_of(mb, st) for mb in range(m) for st in (0, sched.num_stages - 1)}
    if rank not in ends:
        inputs = labels = None
    res = ex.step(inputs, labels, _criterion, num_microbatches=m)
    tag = f"{kind} rank {rank}/{world} M={m} {dtype} zb={zero_bubble}"
    for mb, loss in res.losses.items():
        assert torch.equal(loss, ref_losses[mb]), f"{tag}: loss of micro-batch {mb} differs"
    owners = [None] * world
    dist.all_gather_object(owners, sorted(res.losses), group=group)
    assert sorted(k for o in owners for k in o) == list(range(m)), f"{tag}: losses per rank {owners}"
    n_w = sum(op.kind.name == "W" for op in sched.ops[rank])
    # each W runs the closures of the chunk's two deferrable linears
    assert res.deferred_weight_grads == 2 * n_w, f"{tag}: {res.deferred_weight_grads} deferred grads, {n_w} W ops"
    if kind == "zb1p" or (zero_bubble and kind.startswith("dualpipe") and world > 1):
        assert n_w > 0
    if hook:
        n_fb = sum(op.kind.name == "FB" for op in sched.ops[rank])
        assert HookStage.calls == n_fb, f"{tag}: hook called {HookStage.calls} times for {n_fb} F&B slots"

    grads = {}
    for slot, mod in enumerate(local):
        st = sched.stage_of_slot(rank, slot)
        for (name, p), p_ref in zip(mod.named_parameters(), ref[st].parameters(), strict=True):
            assert p.grad is not None, f"{tag}: stage {st} {name} has no gradient"
            if dtype == torch.float64:
                assert _rel(p.grad, p_ref.grad) < 1e-12, f"{tag}: stage {st} {name} rel {_rel(p.grad, p_ref.grad)}"
            elif dtype == torch.bfloat16:  # bf16 sums in another order (DualPipe copies): a few ulps
                assert _rel(p.grad, p_ref.grad) < 2e-2, f"{tag}: stage {st} {name} rel {_rel(p.grad, p_ref.grad)}"
            else:
                assert _cal_diff(p.grad, p_ref.grad) < 1e-12, f"{tag}: stage {st} {name} diff"
                assert _rel(p.grad, p_ref.grad) < 1e-5, f"{tag}: stage {st} {name} rel {_rel(p.grad, p_ref.grad)}"
        grads[st] = torch.cat([p.grad.reshape(-1) for p in mod.parameters()])
    if kind == "dualpipe":  # both copies of every stage hold the same summed gradient
        every = [None] * world
        dist.all_gather_object(every, grads, group=group)
        for st, g in grads.items():
            copies = [d[st] for d in every if st in d]
            assert len(copies) == 2 and all(torch.equal(c, g) for c in copies), f"{tag}: stage {st} copies differ"

    with torch.no_grad():
        fwd = ex.step(inputs, labels, _criterion, num_microbatches=m, return_outputs=True)
    assert sorted(fwd.outputs) == sorted(res.losses), f"{tag}: forward-only outputs on the wrong rank"
    for mb, out in fwd.outputs.items():
        assert torch.equal(out, ref_outputs[mb]), f"{tag}: forward-only output {mb} differs"
        assert torch.equal(fwd.losses[mb], ref_losses[mb]), f"{tag}: forward-only loss {mb} differs"


def _bad_outputs(solo: dist.ProcessGroup) -> None:
    x = [torch.randn(SHAPE) for _ in range(2)]
    for bad, needle in ((WrongShape(), "fixed p2p shape"), (ReturnsView(), "its input or a view of it")):
        ex = PipelineExecutor([bad, Stage(SHAPE[-1])], "dualpipev", p2p_shape=SHAPE, group=solo)
        with pytest.raises(ValueError, match=needle):
            ex.step(x, x, _criterion)
    with pytest.raises(ValueError, match="2 stage module"):
        PipelineExecutor([Stage(SHAPE[-1])], "dualpipev", p2p_shape=SHAPE, group=solo)
    ex = PipelineExecutor([Stage(SHAPE[-1]), Stage(SHAPE[-1])], "dualpipev", p2p_shape=SHAPE, group=solo)
    with pytest.raises(ValueError, match="criterion is required"):
        ex.step(x, x, None)


class TokenStage(nn.Module):
    """First stage fed with packed token chunks (int64 [chunk_len], like PackedBatch.input_ids rows)."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.block = Stage(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(self.emb(tokens))


class HeadStage(Stage):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__(hidden)
        self.head = DeferrableLinear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def _token_chunks(solo: dist.ProcessGroup) -> None:
    """Integer packed-chunk inputs through a 1-rank DualPipeV (both stages local, handed over in-process)."""
    vocab, chunk_len, m = 23, 17, 3
    torch.manual_seed(5)
    stages = [TokenStage(vocab, SHAPE[-1]), HeadStage(vocab, SHAPE[-1])]
    tokens = [torch.randint(vocab, (chunk_len,)) for _ in range(m)]
    targets = [torch.randint(vocab, (chunk_len,)) for _ in range(m)]

    def crit(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, t)

    ref = copy.deepcopy(stages)
    ref_losses = []
    for x, t in zip(tokens, targets, strict=True):
        loss = crit(ref[1](ref[0](x)), t)
        loss.backward()
        ref_losses.append(loss.detach())
    local = copy.deepcopy(stages)
    res = PipelineExecutor(local, "dualpipev", p2p_shape=(chunk_len, SHAPE[-1]), group=solo).step(tokens, targets, crit)
    assert all(torch.equal(res.losses[i], ref_losses[i]) for i in range(m))
    for mod, mod_ref in zip(local, ref, strict=True):
        for p, p_ref in zip(mod.parameters(), mod_ref.parameters(), strict=True):
            assert _rel(p.grad, p_ref.grad) < 1e-5


def _worker(rank: int, world: int, port: int, cases2: list[tuple], cases4: list[tuple]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        solos = [dist.new_group([r]) for r in range(world)]
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for case in cases2:  # two 2-rank pipelines at once: global ranks {0, 1} and {2, 3}
            _run_case(pairs[rank // 2], *case)
        for case in cases4:  # one 4-rank pipeline over WORLD
            _run_case(None, *case)
        _bad_outputs(solos[rank])
        _token_chunks(solos[rank])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(150)
def test_pipeline_two_and_four_ranks() -> None:
    """One spawn of 4 gloo processes (process start-up dominates the cost): 2-rank pipelines in two
    subgroups, then 4-rank pipelines over all of them."""
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    cases2 = [
        ("dualpipe", 4, f32, True, False),
        ("dualpipe", 6, f32, False, True),
        ("dualpipe", 4, f64, True, False),
        ("dualpipev", 5, f32, True, True),
        ("dualpipev", 4, f64, True, False),
        ("dualpipe", 4, bf16, True, False),
        ("dualpipev", 4, bf16, True, False),
        ("1f1b", 3, f32, False, False),
        ("zb1p", 4, f32, True, False),
    ]
    cases4 = [
        ("dualpipe", 8, f32, True, True),
        ("dualpipev", 8, f32, True, True),
        ("dualpipev", 9, f64, True, False),
        ("1f1b", 5, f32, False, False),
        ("zb1p", 6, f32, True, False),
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(4, _free_port(), cases2, cases4), nprocs=4, join=True)
