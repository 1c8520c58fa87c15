"""Collate / uncollate of packed batches: layout, padding, alignment of per-token fields, exact round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1engine.packing import collate, plan, uncollate


def make_data(lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 50000, (n,), generator=g) for n in lengths]
    adv = [torch.randn(n, generator=g) for n in lengths]
    old = [-torch.rand(n, generator=g) * 5 for n in lengths]
    ref = [-torch.rand(n, generator=g) * 5 for n in lengths]
    mask = [torch.rand(n, generator=g) > 0.3 for n in lengths]
    return ids, adv, old, ref, mask


def pad_rows(seqs: list[torch.Tensor], width: int, fill=0) -> torch.Tensor:
    out = torch.full((len(seqs), width), fill, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : s.numel()] = s
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 120),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.integers(1, 4),
    st.integers(0, 10_000),
)
def test_collate_layout_and_round_trip(chunk_len: int, fracs: list[float], num_ranks: int, seed: int) -> None:
    lengths = [max(1, min(chunk_len, round(f * chunk_len))) for f in fracs]
    p = plan(lengths, chunk_len, num_ranks)
    ids, adv, old, ref, mask = make_data(lengths, seed)
    seen: list[int] = []
    for rank in range(num_ranks):
        b = collate(p, rank, ids, advantages=adv, old_logprobs=old, ref_logprobs=ref, loss_mask=mask, pad_id=-7)
        k = p.chunks_per_rank
        assert b.input_ids.shape == (k, chunk_len) and b.position_ids.shape == (k, chunk_len)
        # layout follows the plan, positions restart at every sequence
        for c_local, c in enumerate(p.chunk_range(rank)):
            ch = p.chunk(c)
            cu = b.cu_seqlens[c_local]
            assert cu.dtype == torch.int32 and int(cu[-1]) == chunk_len
            assert cu[: len(ch.seq_indices) + 1].tolist() == ch.offsets + [ch.tokens]
            for j, (s, off, n) in enumerate(zip(ch.seq_indices, ch.offsets, ch.lengths, strict=True)):
                assert torch.equal(b.input_ids[c_local, off : off + n], ids[s])
                assert torch.equal(b.position_ids[c_local, off : off + n], torch.arange(n))
                assert torch.equal(b.advantages[c_local, off : off + n], adv[s])
                assert torch.equal(b.old_logprobs[c_local, off : off + n], old[s])
                assert torch.equal(b.ref_logprobs[c_local, off : off + n], ref[s])
                assert torch.equal(b.loss_mask[c_local, off : off + n], mask[s])
                assert (b.seq_index[c_local, off : off + n] == s).all()
                assert (b.segment_ids[c_local, off : off + n] == j).all()
            tail = slice(ch.tokens, chunk_len)
            assert (b.input_ids[c_local, tail] == -7).all() and not b.loss_mask[c_local, tail].any()
            assert (b.seq_index[c_local, tail] == -1).all() and not b.valid[c_local, tail].any()
            assert (b.advantages[c_local, tail] == 0).all()
            assert torch.equal(b.position_ids[c_local, tail], torch.arange(chunk_len - ch.tokens))
        # uncollate is the exact inverse, for every field
        for packed, src in ((b.input_ids, ids), (b.advantages, adv), (b.old_logprobs, old), (b.loss_mask, mask)):
            back = uncollate(b, packed)
            assert len(back) == b.seq_ids.numel()
            for s, t in zip(b.seq_ids.tolist(), back, strict=True):
                assert torch.equal(t, src[s])
        seen += b.seq_ids.tolist()
    assert sorted(seen) == list(range(len(lengths)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_input_and_padded_output(dtype: torch.dtype) -> None:
    """[B, T] right-padded inputs give the same batch as lists; uncollate(out=...) refills a padded tensor."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 37, (29,), generator=g)
    p = plan(lengths, 53, 3, cost="attention", attn_coef=5.0)
    width = int(lengths.max()) + 4
    ids, adv, old, _, _ = make_data(lengths.tolist(), 11)
    old = [x.to(dtype) for x in old]
    ids_pad, old_pad = pad_rows(ids, width), pad_rows(old, width)
    seq_adv = torch.randn(29, generator=g)  # one advantage per sequence, broadcast over its tokens
    out = torch.full((29, width), float("nan"), dtype=dtype)
    for rank in range(3):
        a = collate(p, rank, ids, old_logprobs=old, advantages=seq_adv)
        b = collate(p, rank, ids_pad, old_logprobs=old_pad, advantages=seq_adv)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logprobs, b.old_logprobs)
        assert a.old_logprobs.dtype == dtype
        for s, t in zip(a.seq_ids.tolist(), uncollate(a, a.advantages), strict=True):
            assert torch.equal(t, seq_adv[s].expand(int(lengths[s])))
        uncollate(b, b.old_logprobs, out=out)
    for s in range(29):
        n = int(lengths[s])
        assert torch.equal(out[s, :n], old[s])
        assert out[s, n:].isnan().all()


def test_extra_fields_and_flat_cu_seqlens() -> None:
    lengths = [5, 9, 3, 7, 2]
    p = plan(lengths, 12, 1)
    ids = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]
    vec = [torch.randn(n, 4) for n in lengths]  # per-token vectors
    b = collate(p, 0, ids, fields={"hidden": vec})
    assert b.fields["hidden"].shape == (p.num_chunks, 12, 4)
    for s, t in zip(b.seq_ids.tolist(), uncollate(b, b.fields["hidden"]), strict=True):
        assert torch.equal(t, vec[s])
    cu, mx = b.cu_seqlens_flat()
    assert int(cu[-1]) == p.num_chunks * 12 and mx == max(b.max_seqlen)
    # flat cu_seqlens cut at every sequence start of the flattened position_ids
    flat_pos = b.position_ids.reshape(-1)
    assert cu[:-1].tolist() == (flat_pos == 0).nonzero().flatten().tolist()


def test_collate_errors() -> None:
    p = plan([4, 6], 10, 1)
    with pytest.raises(ValueError, match=r"input_ids\[1\]: expected 6 tokens"):
        collate(p, 0, [torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)])
    with pytest.raises(ValueError, match="list of 2"):
        collate(p, 0, [torch.zeros(4, dtype=torch.long)])
    with pytest.raises(ValueError, match="padded width 5"):
        collate(p, 0, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="rank must be in"):
        collate(p, 1, torch.zeros(2, 6, dtype=torch.long))
    b = collate(p, 0, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="values: expected"):
        uncollate(b, torch.zeros(3, 10))


def test_rank_without_sequences_gets_an_all_padding_chunk() -> None:
    """Fewer sequences than required chunks: the extra rank's chunk is pure padding, masked, one segment."""
    p = plan([5], 10, 3)
    for rank in range(3):
        b = collate(p, rank, [torch.arange(1, 6)], advantages=torch.tensor([0.5]), pad_id=0)
        if rank == int(p.placement()[0][0]):
            assert b.input_ids[0, :5].tolist() == [1, 2, 3, 4, 5]
            assert [t.tolist() for t in uncollate(b, b.input_ids)] == [[1, 2, 3, 4, 5]]
        else:
            assert not b.valid.any() and not b.loss_mask.any() and (b.advantages == 0).all()
            assert b.cu_seqlens[0].tolist() == [0, 10] and uncollate(b, b.input_ids) == []
