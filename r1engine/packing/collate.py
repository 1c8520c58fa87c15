"""Collate per-sequence tensors into one rank's packed chunks, and scatter packed outputs back (uncollate).

`collate(plan, rank, input_ids, ...)` lays the sequences of `rank` out as the plan says: a `[chunks, chunk_len]`
row per chunk, sequences back to back at their offsets, the unused tail filled with `pad_id` and loss mask 0.
`position_ids` restart at 0 for every sequence (and for the padding tail, which is a segment of its own so
that `cu_seqlens[c][-1] == chunk_len` and a varlen kernel never mixes it into a real sequence).
`uncollate(batch, values)` is the exact inverse for any per-token output (log-probs, losses, ...).

Per-sequence inputs are either a list of 1-D tensors (one per sequence of the whole plan, indexed by the
global sequence index) or a right-padded `[num_sequences, T]` tensor whose valid prefix of row i has
`plan.lengths[i]` tokens. Per-token fields may also be given per sequence as a `[num_sequences]` tensor
(e.g. one advantage per completion), which is broadcast over the sequence's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from r1engine.packing.planner import PackingPlan

PerSequence = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class PackedBatch:
    """One rank's packed chunks. All `[K, L]` tensors share the layout of `input_ids`."""

    rank: int
    chunk_len: int
    input_ids: torch.Tensor  # [K, L] int64
    position_ids: torch.Tensor  # [K, L] int64, 0 at each sequence start (and at the padding tail's start)
    seq_index: torch.Tensor  # [K, L] int64: global sequence index of each token, -1 at padding
    segment_ids: torch.Tensor  # [K, L] int32: sequence number inside the chunk (0, 1, ...), -1 at padding
    valid: torch.Tensor  # [K, L] bool: True on real tokens
    loss_mask: torch.Tensor  # [K, L]: the given mask packed (0 at padding), or `valid` as float32
    cu_seqlens: list[torch.Tensor]  # per chunk, int32 [segments + 1], last entry == chunk_len
    max_seqlen: list[int]  # per chunk, longest segment
    seq_ids: torch.Tensor  # int64 [S]: global indices of this rank's sequences, in packed (chunk, offset) order
    seq_lengths: torch.Tensor  # int64 [S]: their lengths
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token fields, [K, L] each
    _dst: torch.Tensor | None = None  # int64 [T]: flat [K*L] slot of each real token, in seq_ids order

    @property
    def num_chunks(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def advantages(self) -> torch.Tensor | None:
        return self.fields.get("advantages")

    @property
    def old_logprobs(self) -> torch.Tensor | None:
        return self.fields.get("old_logprobs")

    @property
    def ref_logprobs(self) -> torch.Tensor | None:
        return self.fields.get("ref_logprobs")

    def real_tokens(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The real tokens as one packed row without the chunks' padding tails: their flat `[K*L]` slots, int32
        cu_seqlens over them and the longest sequence. Each sequence's slots are consecutive and `_dst` lists the
        sequences in `seq_ids` order, so the row is `_dst` and its bounds are the running sum of `seq_lengths`."""
        assert self._dst is not None
        cu = torch.zeros(len(self.seq_lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(self.seq_lengths, 0)
        return self._dst, cu, int(self.seq_lengths.max()) if len(self.seq_lengths) else 0

    def cu_seqlens_flat(self) -> tuple[torch.Tensor, int]:
        """cu_seqlens (int32) and max_seqlen for the whole batch flattened to `[K * L]` (chunks back to back)."""
        parts = [torch.zeros(1, dtype=torch.int32)]
        for c, cu in enumerate(self.cu_seqlens):
            parts.append(cu[1:] + c * self.chunk_len)
        return torch.cat(parts), max(self.max_seqlen, default=0)


def _rank_layout(plan: PackingPlan, rank: int):
    chunks = plan.chunk_range(rank)
    c0, c1 = chunks.start, chunks.stop
    p0, p1 = int(plan.chunk_ptr[c0]), int(plan.chunk_ptr[c1])
    seqs = plan.seq_index[p0:p1]
    offs = plan.seq_offset[p0:p1]
    lens = plan.lengths[seqs]
    counts = plan.chunk_ptr[c0 : c1 + 1].diff()
    local_chunk = torch.repeat_interleave(torch.arange(c1 - c0, dtype=torch.int64), counts)
    slot_in_chunk = torch.arange(p1 - p0, dtype=torch.int64) - torch.repeat_interleave(
        plan.chunk_ptr[c0:c1] - p0, counts
    )
    total = int(lens.sum())
    seq_start = torch.cumsum(lens, 0) - lens  # start of each sequence in the concatenation
    within = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(seq_start, lens)
    dst = torch.repeat_interleave(local_chunk * plan.chunk_len + offs, lens) + within
    return c0, c1, seqs, lens, counts, local_chunk, slot_in_chunk, within, dst


def _gather_tokens(
    name: str, data: PerSequence, plan: PackingPlan, seqs: torch.Tensor, lens: torch.Tensor, within: torch.Tensor
) -> torch.Tensor:
    """Values of this rank's sequences, concatenated in packed order: [T, *extra]."""
    n = plan.num_sequences
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] != n:
            raise ValueError(f"{name}: expected [num_sequences={n}] or [num_sequences={n}, T], got {tuple(data.shape)}")
        dev = data.device
        if data.dim() == 1:  # one value per sequence, broadcast over its tokens
            return torch.repeat_interleave(data[seqs.to(dev)], lens.to(dev))
        need = int(lens.max()) if lens.numel() else 0
        if data.shape[1] < need:
            raise ValueError(f"{name}: padded width {data.shape[1]} is shorter than the longest sequence ({need})")
        rows = torch.repeat_interleave(seqs, lens)
        return data[rows.to(dev), within.to(dev)]
    if len(data) != n:
        raise ValueError(f"{name}: expected a list of {n} per-sequence tensors, got {len(data)}")
    picked = []
    for s, ln in zip(seqs.tolist(), lens.tolist(), strict=True):
        t = data[s]
        if t.dim() < 1 or t.shape[0] != ln:
            raise ValueError(f"{name}[{s}]: expected {ln} tokens (plan.lengths[{s}]), got shape {tuple(t.shape)}")
        picked.append(t)
    if not picked:
        ref = data[0] if n else torch.empty(0)
        return ref.new_empty((0, *ref.shape[1:]))
    return torch.cat(picked)


def collate(
    plan: PackingPlan,
    rank: int,
    input_ids: PerSequence,
    *,
    advantages: PerSequence | None = None,
    old_logprobs: PerSequence | None = None,
    ref_logprobs: PerSequence | None = None,
    loss_mask: PerSequence | None = None,
    fields: dict[str, PerSequence] | None = None,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack the sequences that `plan` gives to `rank` into `[chunks, chunk_len]` tensors.

    Args:
        plan: the packing plan (from `r1engine.packing.plan`).
        rank: which rank's chunks to build.
        input_ids: per-sequence token ids (list of 1-D tensors or right-padded `[n, T]`).
        advantages, old_logprobs, ref_logprobs, loss_mask: optional per-token fields (same formats, or `[n]`
            per-sequence values); padding gets 0.
        fields: any other per-token fields by name, packed the same way.
        pad_id: token id written into the padding.
    """
    c0, c1, seqs, lens, counts, local_chunk, slot_in_chunk, within, dst = _rank_layout(plan, rank)
    k, length = c1 - c0, plan.chunk_len
    ids = _gather_tokens("input_ids", input_ids, plan, seqs, lens, within)
    device = ids.device  # index tensors are built on the CPU; outputs live where the inputs do
    input_ids_out = torch.full((k * length,), pad_id, dtype=torch.int64, device=device)
    input_ids_out[dst.to(device)] = ids.to(torch.int64)

    used = plan.chunk_tokens[c0:c1]
    # padding tail: its own segment with positions 0, 1, ... from the first unused slot
    position_ids = (torch.arange(length, dtype=torch.int64)[None, :] - used[:, None]).clamp_min(0).reshape(-1)
    position_ids[dst] = within
    seq_index = torch.full((k * length,), -1, dtype=torch.int64)
    seq_index[dst] = torch.repeat_interleave(seqs, lens)
    segment_ids = torch.full((k * length,), -1, dtype=torch.int32)
    segment_ids[dst] = torch.repeat_interleave(slot_in_chunk, lens).to(torch.int32)
    valid = torch.zeros(k * length, dtype=torch.bool)
    valid[dst] = True

    named: dict[str, PerSequence] = {}
    for name, value in (("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            named[name] = value
    for name, value in (fields or {}).items():
        if name in named or name in ("input_ids", "loss_mask"):
            raise ValueError(f"fields: '{name}' clashes with a named argument")
        named[name] = value
    packed: dict[str, torch.Tensor] = {}
    for name, value in named.items():
        vals = _gather_tokens(name, value, plan, seqs, lens, within)
        out = vals.new_zeros((k * length, *vals.shape[1:]))
        out[dst.to(vals.device)] = vals
        packed[name] = out.view(k, length, *vals.shape[1:])
    if loss_mask is not None:
        vals = _gather_tokens("loss_mask", loss_mask, plan, seqs, lens, within)
        mask = vals.new_zeros((k * length, *vals.shape[1:]))
        mask[dst.to(vals.device)] = vals
        mask = mask.view(k, length, *vals.shape[1:])
    else:
        mask = valid.to(device=device, dtype=torch.float32).view(k, length)

    cu_seqlens, max_seqlen = [], []
    chunk_lens = torch.split(lens, counts.tolist())
    for c in range(k):
        segs = chunk_lens[c]
        tail = length - int(used[c])
        if tail > 0:
            segs = torch.cat([segs, torch.tensor([tail], dtype=torch.int64)])
        cu = torch.zeros(segs.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(segs, 0)
        cu_seqlens.append(cu)
        max_seqlen.append(int(segs.max()) if segs.numel() else 0)

    # seq_ids in packed order, _dst stays in packed order as well (uncollate splits by seq_lengths)
    return PackedBatch(
        rank=rank,
        chunk_len=length,
        input_ids=input_ids_out.view(k, length),
        position_ids=position_ids.view(k, length).to(device),
        seq_index=seq_index.view(k, length).to(device),
        segment_ids=segment_ids.view(k, length).to(device),
        valid=valid.view(k, length).to(device),
        loss_mask=mask,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        seq_ids=seqs.clone(),
        seq_lengths=lens.clone(),
        fields=packed,
        _dst=dst,
    )


def uncollate(
    batch: PackedBatch, values: torch.Tensor, *, out: torch.Tensor | None = None
) -> list[torch.Tensor] | torch.Tensor:
    """Scatter per-token outputs of a packed batch back to per-sequence order (exact inverse of `collate`).

    Args:
        batch: the PackedBatch the values were computed on.
        values: `[K, L, *extra]` per-token outputs (log-probs, losses, ...).
        out: optional right-padded `[num_sequences, T, *extra]` tensor; row `s` gets sequence `s`'s values in
            its first `len(s)` slots (rows of other ranks' sequences are left untouched). Returned if given.

    Returns:
        without `out`: a list of 1-D (or `[len, *extra]`) tensors, one per sequence of this rank, in the order
        of `batch.seq_ids` (packed order); otherwise `out`.
    """
    k, length = batch.input_ids.shape
    if values.dim() < 2 or values.shape[0] != k or values.shape[1] != length:
        raise ValueError(f"values: expected [{k}, {length}, ...] like input_ids, got {tuple(values.shape)}")
    assert batch._dst is not None
    flat = values.reshape(k * length, *values.shape[2:])[batch._dst.to(values.device)]
    if out is None:
        return list(torch.split(flat, batch.seq_lengths.tolist()))
    lens = batch.seq_lengths
    need = int(lens.max()) if lens.numel() else 0
    if out.dim() < 2 or out.shape[1] < need:
        raise ValueError(f"out: expected [num_sequences, T >= {need}, ...], got {tuple(out.shape)}")
    seq_start = torch.cumsum(lens, 0) - lens
    within = torch.arange(int(lens.sum()), dtype=torch.int64) - torch.repeat_interleave(seq_start, lens)
    rows = torch.repeat_interleave(batch.seq_ids, lens)
    out[rows.to(out.device), within.to(out.device)] = flat.to(out.dtype)
    return out
