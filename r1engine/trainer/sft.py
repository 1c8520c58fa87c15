"""Cold-start SFT: teach the base policy the R1 template and the task's worked method from a few traces,
so that RL starts from a model that sometimes succeeds (R1's stage 1, scaled down)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from r1engine.data.addition import AdditionTask, ProblemStream
from r1engine.models.policy import PolicyModel
from r1engine.ops import token_logprobs
from r1engine.trainer.sequences import build_sequences, loss_tokens, pack, packed_forward, packed_mtp_loss


def sft_loss(model: PolicyModel, seqs, chunk_len: int, mtp_coef: float, loss_backend: str = "auto"):
    """Mean next-token cross-entropy on completion tokens (+ MTP loss); returns (total, ce, mtp)."""
    batch, _ = pack(seqs, chunk_len)
    tokens = loss_tokens(batch)
    out, cu = packed_forward(model, batch)
    logits = model.logits(out.hidden[tokens.index])
    ce = -token_logprobs(logits, tokens.targets, backend=loss_backend).mean()
    mtp = packed_mtp_loss(model, batch, out, cu, mtp_coef)
    return ce + mtp, ce.detach(), mtp.detach()


def cold_start_sft(
    model: PolicyModel,
    task: AdditionTask,
    stream: ProblemStream,
    encode,
    eos_id: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    chunk_len: int,
    mtp_coef: float,
    loss_backend: str = "auto",
    progress: bool = True,
) -> list[float]:
    """Train `model` in place on worked solutions; returns the per-step cross-entropy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="cold-start SFT", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        problems = stream.take(batch_size)
        seqs = build_sequences(
            [encode(p.prompt) for p in problems], [encode(task.solution(p), bos=False) + [eos_id] for p in problems]
        )
        loss, ce, mtp = sft_loss(model, seqs, chunk_len, mtp_coef, loss_backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(ce))
        bar.set_postfix(ce=f"{float(ce):.3f}", mtp=f"{float(mtp):.3f}")
    return losses
