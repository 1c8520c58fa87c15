"""Cold-start SFT: teach the base policy the R1 template and the task's worked method from a few traces,
so that RL starts from a model that sometimes succeeds (R1's stage 1, scaled down)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    out = packed_forward(model, batch)
    device = out.hidden.device
    logits = model.logits(out.hidden[tokens.index.to(device)])
    ce = -token_logprobs(logits, tokens.targets.to(device), backend=loss_backend).mean()
    mtp = packed_mtp_loss(model, batch, out, mtp_coef)
    return ce + mtp, ce.detach(), mtp.detach()


def supervised_finetune(
    model: PolicyModel,
    examples: Iterator[tuple[str, str]],
    encode: Callable[..., list[int]],
    eos_id: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    chunk_len: int,
    mtp_coef: float,
    loss_backend: str = "auto",
    progress: bool = True,
    desc: str = "SFT",
) -> list[float]:
    """Train `model` in place on (prompt, completion) text pairs drawn `batch_size` at a time from `examples`
    (the loss covers the completion and its end-of-sequence token); returns the per-step cross-entropy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        pairs = [next(examples) for _ in range(batch_size)]
        seqs = build_sequences(
            [encode(prompt) for prompt, _ in pairs], [encode(text, bos=False) + [eos_id] for _, text in pairs]
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


def cold_start_sft(
    model: PolicyModel,
    task: AdditionTask,
    stream: ProblemStream,
    encode: Callable[..., list[int]],
    eos_id: int,
    *,
    style: str = "compact",
    progress: bool = True,
    **options,
) -> list[float]:
    """Supervised fine-tuning on the task's worked solutions (in `style`) for problems of `stream`."""
    examples = ((p.prompt, task.solution(p, style)) for p in stream)
    return supervised_finetune(model, examples, encode, eos_id, progress=progress, desc="cold-start SFT", **options)
