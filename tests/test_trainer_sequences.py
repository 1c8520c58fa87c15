"""Packed training sequences: the packed forward computes only real tokens and equals per-sequence forwards."""

from __future__ import annotations

import torch

from r1engine.models import PolicyConfig, PolicyModel
from r1engine.trainer.sequences import build_sequences, pack, packed_forward, packed_mtp_loss


def _batch(lengths: list[int], chunk_len: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (3,), generator=g).tolist() for _ in lengths]
    completions = [torch.randint(4, vocab, (n - 3,), generator=g).tolist() for n in lengths]
    seqs = build_sequences(prompts, completions)
    batch, _ = pack(seqs, chunk_len)
    return seqs, batch


def test_packed_forward_skips_padding_and_matches_each_sequence():
    torch.manual_seed(0)
    model = PolicyModel(PolicyConfig.tiny())
    lengths = [9, 4, 17, 6, 12, 5]
    seqs, batch = _batch(lengths, chunk_len=24, vocab=model.config.vocab_size)
    assert not bool(batch.valid.all()), "the test needs chunks with padding tails"

    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
    out = packed_forward(model, batch)
    handle.remove()
    assert seen == [sum(lengths)]  # the padding tails never entered the model
    assert out.hidden.shape == (batch.input_ids.numel(), model.config.hidden_size)  # the full [K*L] layout

    hidden = out.hidden.detach()
    valid = batch.valid.reshape(-1)
    assert bool((hidden[~valid] == 0).all())
    flat_seq = batch.seq_index.reshape(-1)
    for s, ids in enumerate(seqs.input_ids):
        ref = model(ids[None]).hidden[0].detach()
        torch.testing.assert_close(hidden[flat_seq == s], ref, rtol=1e-5, atol=1e-5)


def test_packed_forward_gradients_match_an_unpadded_row():
    torch.manual_seed(1)
    model = PolicyModel(PolicyConfig.tiny())
    lengths = [7, 11, 3, 8]
    seqs, batch = _batch(lengths, chunk_len=16, vocab=model.config.vocab_size)
    out = packed_forward(model, batch)
    out.hidden.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    keep, cu, max_seqlen = batch.real_tokens()
    row = model(
        batch.input_ids.reshape(-1)[keep],
        position_ids=batch.position_ids.reshape(-1)[keep],
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
    )
    row.hidden.square().sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert cu.tolist() == [0, *torch.tensor([lengths[i] for i in batch.seq_ids]).cumsum(0).tolist()]
    # the row holds exactly the real tokens, and each cu segment is one whole sequence from position 0
    assert torch.equal(keep.sort().values, batch.valid.reshape(-1).nonzero().squeeze(1))
    seq, pos = batch.seq_index.reshape(-1)[keep], batch.position_ids.reshape(-1)[keep]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert len(set(seq[a:b].tolist())) == 1 and torch.equal(pos[a:b], torch.arange(b - a))


def test_packed_mtp_loss_does_not_depend_on_the_padding():
    """The MTP loss of the same sequences packed with padding tails (short chunks) and without (one exact chunk)."""
    torch.manual_seed(2)
    model = PolicyModel(PolicyConfig.tiny())
    assert model.config.num_mtp_layers >= 1
    lengths = [9, 4, 17, 6, 12, 5]
    losses = []
    for chunk_len in (24, sum(lengths)):
        _, batch = _batch(lengths, chunk_len=chunk_len, vocab=model.config.vocab_size)
        seen = []
        proj = model.model.mtp_layers[0].input_proj
        hook = proj.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.shape[-2]))
        losses.append(packed_mtp_loss(model, batch, packed_forward(model, batch), coef=0.3))
        hook.remove()
        assert seen and all(n == sum(lengths) for n in seen)  # the MTP layer sees the real tokens only
    assert losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
