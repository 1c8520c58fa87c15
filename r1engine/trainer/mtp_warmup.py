"""MTP warm-up: train the MTP layers alone, on the policy's own samples, before RL.

MTP layers attached to a checkpoint that never had them draft poorly, so speculation would cost more than it saves
for the first many RL steps (the MTP loss in the RL step trains them only slowly beside the policy loss). A few
hundred steps on the MTP loss alone, with the body frozen, fix that first: the samples come from the rollout engine
(the policy's own distribution, what the drafter has to predict at rollout time), the body runs without gradients
and the optimizer holds only the MTP layers' parameters. The drafts never change what is sampled (speculation is
exact), so the engine's drafter is updated once, at the end, and the acceptance is measured before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from r1engine.models.mtp import mtp_parameters
from r1engine.models.policy import PolicyModel
from r1engine.trainer.sequences import build_sequences, pack, packed_forward, packed_mtp_loss


@dataclass
class WarmupResult:
    """What a warm-up did: the MTP loss per step and the rollout's draft acceptance before and after it."""

    losses: list[float] = field(default_factory=list)
    acceptance_before: float = float("nan")
    acceptance_after: float = float("nan")

    def metrics(self) -> dict[str, float]:
        return {
            "mtp_warmup/steps": float(len(self.losses)),
            "mtp_warmup/loss_first": self.losses[0] if self.losses else float("nan"),
            "mtp_warmup/loss_last": self.losses[-1] if self.losses else float("nan"),
            "mtp_warmup/acceptance_before": self.acceptance_before,
            "mtp_warmup/acceptance_after": self.acceptance_after,
        }


def mtp_warmup(
    model: PolicyModel,
    rollout: Any,
    prompts: Iterator[list[int]],
    *,
    steps: int,
    lr: float,
    prompts_per_step: int,
    samples_per_prompt: int,
    max_new_tokens: int,
    stop_token_ids: list[int],
    chunk_len: int,
    seed: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    progress: bool = True,
    after_step: Callable[[int, float], None] | None = None,
) -> WarmupResult:
    """Train `model`'s MTP layers for `steps` optimizer steps on samples of `rollout` (an engine holding `model`'s
    weights) for prompts drawn from `prompts`, then push the new MTP weights into the engine. The body's weights
    are not touched. Returns the losses and the acceptance of the engine's drafts before and after."""
    if model.config.num_mtp_layers == 0:
        raise ValueError("model.mtp_warmup_steps: the model has no MTP layers to warm up (model.mtp_layers >= 1)")
    params = mtp_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = WarmupResult()

    def sample(step: int):
        batch_prompts = [next(prompts) for _ in range(prompts_per_step)]
        out = rollout.generate(
            batch_prompts, n=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
            stop_token_ids=stop_token_ids, seed=seed * 1_000_003 + step,
        )  # fmt: skip
        rows = [batch_prompts[i] for i in out.prompt_index.tolist()]
        return build_sequences(rows, out.completion_ids), out.stats.acceptance_rate

    was_training = model.training
    model.train()
    bar = tqdm(range(steps), desc="MTP warm-up", disable=not progress, dynamic_ncols=True)
    for step in bar:
        seqs, acceptance = sample(step)
        if step == 0:
            result.acceptance_before = acceptance
        batch, _ = pack(seqs, chunk_len, pad_id=pad_id)
        with torch.no_grad():  # the body is frozen: its hidden states are inputs here
            out = packed_forward(model, batch)
        loss = packed_mtp_loss(model, batch, out, coef=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        result.losses.append(float(loss.detach()))
        bar.set_postfix(mtp_ce=f"{result.losses[-1]:.3f}")
        if after_step is not None:
            after_step(step, result.losses[-1])
    model.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    rollout.sync_weights(model)
    _, result.acceptance_after = sample(steps)
    return result
