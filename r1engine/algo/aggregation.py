"""Which tokens a loss counts and with what weight: per-token advantages of packed batches, the aggregation
weights of the GRPO-family losses, and the sequences of a batch that carry a gradient."""

from __future__ import annotations

import torch

__all__ = [
    "ADVANTAGE_LAYOUTS",
    "AGGREGATIONS",
    "aggregation_weights",
    "loss_share",
    "masked_mean",
    "sequences_with_gradient",
    "token_advantages",
]

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() not in (1, 2):
        raise ValueError(f"mask: expected shape [B, T] or [N], got shape {tuple(mask.shape)}")


ADVANTAGE_LAYOUTS = ("token", "sequence")


def token_advantages(
    advantages: torch.Tensor,
    num_tokens: int,
    segment_ids: torch.Tensor | None = None,
    advantages_per: str | None = None,
) -> torch.Tensor:
    """Packed advantages, one per token ``[N]``, from ``advantages`` given per token (``[N]``) or per sequence
    (``[S]`` with ``segment_ids``, S > max(segment_ids)).

    ``advantages_per`` ("token" | "sequence") says which; None infers it from the shape, and refuses the one case
    where the shape cannot tell: ``[N]`` when N = max(segment_ids) + 1 and the segments are not one token each
    (then both readings fit and give different losses)."""
    if advantages_per not in (None, *ADVANTAGE_LAYOUTS):
        raise ValueError(f"advantages_per: expected None, 'token' or 'sequence', got {advantages_per!r}")
    n = num_tokens
    if advantages.dim() != 1:
        raise ValueError(f"advantages: expected shape [{n}] (per token) or [S] (per sequence), got "
                         f"{list(advantages.shape)}")  # fmt: skip
    k = advantages.shape[0]
    if segment_ids is None:
        if advantages_per == "sequence":
            raise ValueError("advantages_per='sequence': needs segment_ids (which sequence each token belongs to)")
        if k != n:
            raise ValueError(f"advantages: expected shape [{n}] (per token) or [S] with segment_ids, got [{k}]")
        return advantages
    num_seqs = int(segment_ids.max()) + 1 if n else 0
    per = advantages_per
    if per is None:
        if k == n == num_seqs and not torch.equal(segment_ids.long(), torch.arange(n, device=segment_ids.device)):
            raise ValueError(
                f"advantages: shape [{k}] is one per token (N = {n}) and one per sequence (max(segment_ids) + 1 = "
                f"{num_seqs}) at once; say which with advantages_per='token' or advantages_per='sequence'"
            )
        per = "token" if k == n else "sequence"
    if per == "token":
        if k != n:
            raise ValueError(f"advantages: advantages_per='token' needs shape [{n}], got [{k}]")
        return advantages
    if k < num_seqs:
        raise ValueError(
            f"advantages: expected one value per sequence ([S] with S > max(segment_ids) = {num_seqs - 1}), got "
            f"shape [{k}]"
        )
    return advantages[segment_ids.long()]


def aggregation_weights(
    mask: torch.Tensor,
    agg: str,
    *,
    max_len: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token weights (fp32, shape of ``mask``) such that ``loss = sum(weights * loss_tok)`` is the aggregate.

    ``mask`` is ``[B, T]`` (padded batch: one row per sequence) or ``[N]`` (packed tokens; ``segment_ids [N]``
    gives each token's sequence index, values in ``[0, N)``; without it all N tokens form one sequence).

    * ``"seq-mean-token-mean"`` (paper GRPO): mean over each sequence's unmasked tokens, then mean over the
      sequences that have any; fully masked sequences contribute nothing and are not counted. Peers differ here:
      verl divides by the non-empty sequences (as here), TRL and Liger-Kernel by all rows of the batch, so a batch
      with empty rows gets a smaller loss from them.
    * ``"token-mean"`` (DAPO): mean over all unmasked tokens of the batch.
    * ``"seq-mean-token-sum-norm"`` (Dr.GRPO): sum over tokens / (num_seqs * horizon) with a constant horizon:
      ``max_len`` if given, else ``T`` (padded) or the longest sequence in tokens (packed); num_seqs counts every
      sequence, masked or not (packed: ``max(segment_ids) + 1``, so a sequence with no token present counts too).
      Dr.GRPO's paper uses the generation budget as the constant: pass ``max_len``.

    All-masked input gives all-zero weights (a zero loss), never NaN.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: expected one of {AGGREGATIONS}, got {agg!r}")
    _check_mask(mask)
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len: expected a positive int or None, got {max_len!r}")
    m = mask.to(torch.float32)
    if agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if mask.dim() == 2:
        if segment_ids is not None:
            raise ValueError("segment_ids: only valid with packed [N] tokens, got a [B, T] mask")
        if agg == "seq-mean-token-mean":
            lens = m.sum(dim=1, keepdim=True)
            num_seqs = (lens > 0).sum().clamp(min=1).to(torch.float32)
            return m / (lens.clamp(min=1.0) * num_seqs)
        horizon = float(max_len if max_len is not None else mask.shape[1])
        return m / (mask.shape[0] * horizon)
    n = mask.shape[0]
    if segment_ids is None:
        seg = torch.zeros(n, dtype=torch.long, device=mask.device)
    else:
        if segment_ids.shape != mask.shape or segment_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"segment_ids: expected an integer tensor of shape {tuple(mask.shape)} (like mask), got "
                f"{segment_ids.dtype} shape {tuple(segment_ids.shape)}"
            )
        seg = segment_ids.long()
    # Static-shape segment reductions (at most N segments), so this also traces under torch.compile.
    lens = torch.zeros(n, dtype=torch.float32, device=mask.device).index_add_(0, seg, m)
    if agg == "seq-mean-token-mean":
        num_seqs = (lens > 0).sum().clamp(min=1).to(torch.float32)
        return m / (lens[seg].clamp(min=1.0) * num_seqs)
    sizes = torch.zeros(n, dtype=torch.float32, device=mask.device).index_add_(0, seg, torch.ones_like(m))
    num_seqs = (seg.max() + 1).clamp(min=1).to(torch.float32) if n else torch.ones((), device=mask.device)
    horizon = torch.tensor(float(max_len), device=mask.device) if max_len is not None else sizes.max().clamp(min=1)
    return m / (num_seqs * horizon)


def loss_share(loss_tokens: torch.Tensor, index: list[int], agg: str, *, max_len: int | None = None) -> float:
    """The factor that turns the loss of the sequences `index` alone into their part of the whole batch's loss.

    `loss_tokens`: the number of loss tokens of each of the batch's S sequences, ``[S]``. Whatever `agg` is, the
    aggregate of a subset differs from its part of the batch's aggregate only by the normaliser (the batch's token
    count, sequence count or horizon), so one factor, taken from `aggregation_weights` on both, converts it: micro-
    batches weighted this way sum to the batch's loss and gradient."""
    counts = loss_tokens.to(torch.int64).cpu()
    if counts.dim() != 1:
        raise ValueError(f"loss_tokens: expected an [S] tensor, got shape {tuple(loss_tokens.shape)}")

    def weights(rows: list[int]) -> torch.Tensor:
        seg = torch.repeat_interleave(torch.arange(len(rows)), counts[rows])
        seg = torch.unique(seg, return_inverse=True)[1]  # sequences without loss tokens are absent, as when packed
        return aggregation_weights(torch.ones(len(seg)), agg, max_len=max_len, segment_ids=seg)

    chosen = torch.zeros(len(counts), dtype=torch.bool)
    chosen[index] = True
    part = weights(list(range(len(counts))))[torch.repeat_interleave(chosen, counts)].sum()
    alone = weights(list(index)).sum()
    return float(part / alone) if alone > 0 else 1.0


def sequences_with_gradient(
    advantages: torch.Tensor, loss_tokens: torch.Tensor, agg: str, *, max_len: int | None = None
) -> tuple[list[int], float]:
    """The sequences whose policy loss has a gradient, and their `loss_share`.

    Without a KL term, a sequence whose advantage is exactly 0 (every completion of a GRPO group scored alike) adds
    nothing to the clipped surrogate or its gradient, at any ratio; it only enters the aggregation's normaliser.
    Training on the returned subset and multiplying its loss by the factor gives the batch's loss and gradient
    (equal up to summation order). When no sequence has a gradient the shortest one is kept, so that the optimizer
    still takes its (zero-gradient) step as it would on the whole batch.

    `advantages` and `loss_tokens` (the number of loss tokens of each sequence): ``[S]``. Returns
    (indices in ascending order, factor)."""
    if advantages.dim() != 1 or loss_tokens.shape != advantages.shape:
        raise ValueError(
            f"advantages and loss_tokens: expected two [S] tensors, got shapes {tuple(advantages.shape)} and "
            f"{tuple(loss_tokens.shape)}"
        )
    keep = torch.nonzero(advantages != 0).flatten().tolist()
    if not keep:
        keep = [int(torch.argmin(loss_tokens))]
    return keep, loss_share(loss_tokens, keep, agg, max_len=max_len)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask != 0`` (0 when the mask is empty), as a 0-d fp32 tensor."""
    m = (mask != 0).to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp(min=1.0)
