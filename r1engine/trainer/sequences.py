"""From rollouts to packed training batches, and the packed forward that scores them.

A sequence is prompt + completion. Per-token fields are aligned with input positions: position p carries the
target `seq[p + 1]`, and it is a loss position when that target is a completion token. Sequences are packed
into fixed-length chunks by the planner (`r1engine.packing`), so no compute is spent on padding beyond the
chunks' tails, and the model attends only within each sequence (varlen attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1engine.models.policy import PolicyModel
from r1engine.packing import PackedBatch, collate, plan, uncollate


@dataclass
class SequenceBatch:
    """Prompt + completion token sequences with their per-token training fields (lists, one entry per sequence)."""

    input_ids: list[torch.Tensor]  # int64 [len]
    targets: list[torch.Tensor]  # int64 [len]: next token (0 at the last position)
    loss_mask: list[torch.Tensor]  # float32 [len]: 1 where the target is a completion token
    sampler_logprobs: list[torch.Tensor]  # float32 [len]: the rollout engine's log-prob of each target (0 elsewhere)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(s) for s in self.input_ids], dtype=torch.int64)

    def subset(self, index: list[int]) -> SequenceBatch:
        return SequenceBatch(*([getattr(self, f)[i] for i in index] for f in self.__dataclass_fields__))


def build_sequences(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    sampler_logprobs: list[torch.Tensor] | None = None,
) -> SequenceBatch:
    """Sequences for completions `completion_ids[i]` of prompts `prompt_ids[i]` (already expanded per completion)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} entries but completion_ids has {len(completion_ids)}")
    out = SequenceBatch([], [], [], [])
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if not prompt:
            raise ValueError(f"prompt_ids[{i}] is empty: a sequence needs at least one prompt token")
        ids = torch.tensor(list(prompt) + list(completion), dtype=torch.int64)
        targets = torch.zeros_like(ids)
        targets[:-1] = ids[1:]
        mask = torch.zeros(len(ids), dtype=torch.float32)
        first = len(prompt) - 1  # position whose target is the first completion token
        mask[first : len(ids) - 1] = 1.0
        lp = torch.zeros(len(ids), dtype=torch.float32)
        if sampler_logprobs is not None and len(completion):
            lp[first : len(ids) - 1] = sampler_logprobs[i].float()
        out.input_ids.append(ids)
        out.targets.append(targets)
        out.loss_mask.append(mask)
        out.sampler_logprobs.append(lp)
    return out


def pack(
    seqs: SequenceBatch,
    chunk_len: int,
    *,
    num_ranks: int = 1,
    rank: int = 0,
    fields: dict[str, list[torch.Tensor] | torch.Tensor] | None = None,
    pad_id: int = 0,
) -> tuple[PackedBatch, dict[str, float]]:
    """Pack `seqs` (best-fit, equal chunk count per rank) and collate `rank`'s chunks; also return plan stats."""
    longest = int(seqs.lengths.max())
    if longest > chunk_len:
        raise ValueError(
            f"training.chunk_len={chunk_len} is shorter than the longest prompt + completion ({longest} tokens)"
        )
    packing_plan = plan(seqs.lengths, chunk_len, num_ranks)
    all_fields = {"targets": seqs.targets, "sampler_logprobs": seqs.sampler_logprobs, **(fields or {})}
    batch = collate(packing_plan, rank, seqs.input_ids, loss_mask=seqs.loss_mask, fields=all_fields, pad_id=pad_id)
    stats = {"packing/num_chunks": packing_plan.num_chunks, "packing/padding_frac": packing_plan.padding_fraction}
    return batch, stats


@dataclass
class PackedTokens:
    """The loss positions of a packed batch, flattened: what the fused GRPO loss consumes."""

    index: torch.Tensor  # int64 [M]: flat [K*L] positions of the loss tokens
    targets: torch.Tensor  # int64 [M]
    segment_ids: torch.Tensor  # int64 [M]: sequence number in [0, S) (for per-sequence aggregation)
    seq_ids: torch.Tensor  # int64 [S]: the global sequence index of each segment


def loss_tokens(batch: PackedBatch) -> PackedTokens:
    mask = batch.loss_mask.reshape(-1) > 0
    index = mask.nonzero().squeeze(1)
    seq_ids, segment_ids = torch.unique(batch.seq_index.reshape(-1)[index], return_inverse=True)
    return PackedTokens(index, batch.fields["targets"].reshape(-1)[index], segment_ids, seq_ids)


def packed_forward(model: PolicyModel, batch: PackedBatch):
    """Run the model over all chunks as one packed row; returns `ModelOutput` with hidden `[K*L, H]`.

    Only the real tokens are computed: in one flat row the chunks' padding tails would cost every layer's work and
    attention over a segment of their own for nothing (they are 19% of the slots for ~60-token sequences in
    256-token chunks). The outputs are scattered back to the `[K*L]` layout (zeros on padding), so loss-token
    indices, the MTP loss and uncollate keep working on it."""
    keep, real_cu, max_seqlen = batch.real_tokens()
    device = model.device
    slots = keep.to(device)
    out = model(
        batch.input_ids.reshape(-1).to(device)[slots],
        position_ids=batch.position_ids.reshape(-1).to(device)[slots],
        cu_seqlens=real_cu.to(device),
        max_seqlen=max_seqlen,
    )
    if len(keep) < batch.input_ids.numel():

        def full(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros(batch.input_ids.numel(), *t.shape[1:]).index_copy(0, slots, t)

        out.hidden, out.last_hidden = full(out.hidden), full(out.last_hidden)
    return out


def completion_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat mask of positions holding a completion token, from the mask of positions whose *target* is one
    (shifted right by one inside the packed row; sequence ends carry 0, so nothing leaks across sequences)."""
    return torch.roll(loss_mask.reshape(-1), 1)


def packed_mtp_loss(model: PolicyModel, batch: PackedBatch, out, coef: float) -> torch.Tensor:
    """The MTP head's loss on the completion tokens of a packed batch (`out` from `packed_forward`); 0 when `coef`
    is 0 or the model has no MTP layers. Like the main forward, it runs on the real tokens only."""
    device = out.last_hidden.device
    if coef <= 0 or model.config.num_mtp_layers == 0:
        return torch.zeros((), device=device)
    keep, real_cu, max_seqlen = batch.real_tokens()
    slots = keep.to(device)
    return model.mtp_loss(
        batch.input_ids.reshape(-1).to(device)[slots],
        out.last_hidden[slots],
        position_ids=batch.position_ids.reshape(-1).to(device)[slots],
        cu_seqlens=real_cu.to(device),
        max_seqlen=max_seqlen,
        loss_mask=completion_token_mask(batch.loss_mask).to(device)[slots],
        lam=coef,
    )


@torch.no_grad()
def packed_logprobs(
    model: PolicyModel, batch: PackedBatch, tokens: PackedTokens, temperature: float, loss_backend: str = "auto"
) -> torch.Tensor:
    """Log-probs `[M]` of the loss tokens under `model` (old-policy / reference inference)."""
    from r1engine.ops import token_logprobs

    out = packed_forward(model, batch)
    logits = model.logits(out.hidden[tokens.index.to(out.hidden.device)])
    return token_logprobs(logits, tokens.targets.to(logits.device), temperature, backend=loss_backend).float().cpu()


def per_sequence(batch: PackedBatch, tokens: PackedTokens, values: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Scatter loss-token values `[M]` back to per-sequence, position-aligned tensors (0 off the loss tokens)."""
    full = torch.zeros(batch.input_ids.numel(), dtype=values.dtype)
    full[tokens.index] = values
    parts = uncollate(batch, full.view_as(batch.input_ids))
    out: list[torch.Tensor] = [torch.empty(0)] * n
    for seq, part in zip(batch.seq_ids.tolist(), parts, strict=True):
        out[seq] = part
    return out
