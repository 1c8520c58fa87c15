"""The training step leaves sequences with advantage 0 out and runs micro-batches without changing its loss,
gradient or update."""

from __future__ import annotations

import copy

import pytest
import torch

from r1engine.algo.loss import AGGREGATIONS, grpo_loss_reference, sequences_with_gradient
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.trainer.config import GRPOConfig
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.grpo import grpo_train_step
from r1engine.trainer.sequences import build_sequences, loss_tokens, pack, packed_logprobs, per_sequence


def _packed_problem(counts: list[int], vocab: int, gen: torch.Generator):
    n = sum(counts)
    seg = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    old = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1) + 0.3 * torch.randn(n, generator=gen)
    return logits, targets, old, seg


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("max_len", [None, 13])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_the_kept_sequences_rescaled_give_the_batch_loss_and_gradient(agg, max_len, dual_clip):
    gen = torch.Generator().manual_seed(len(agg) + (max_len or 0))
    counts = [5, 1, 9, 3, 7, 2, 11, 4]  # the longest sequence has advantage 0: Dr.GRPO's horizon must not move
    adv = torch.tensor([0.7, 0.0, 0.0, -1.2, 0.0, 0.4, 0.0, -0.3], dtype=torch.float64)
    logits, targets, old, seg = _packed_problem(counts, 17, gen)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg, max_len=max_len)

    full = logits.clone().requires_grad_()
    loss, _ = grpo_loss_reference(full, targets, adv[seg], torch.ones(len(seg)), old, segment_ids=seg, **kw)
    loss.backward()

    keep, scale = sequences_with_gradient(adv, torch.tensor(counts), agg, max_len=max_len)
    assert keep == [0, 3, 5, 7]
    rows = torch.cat([torch.nonzero(seg == s).flatten() for s in keep])
    sub_seg = torch.unique(seg[rows], return_inverse=True)[1]
    part = logits[rows].clone().requires_grad_()
    sub, _ = grpo_loss_reference(part, targets[rows], adv[seg[rows]], torch.ones(len(rows)), old[rows],
                                 segment_ids=sub_seg, **kw)  # fmt: skip
    (sub * scale).backward()

    torch.testing.assert_close(sub * scale, loss)
    torch.testing.assert_close(part.grad, full.grad[rows])
    skipped = torch.ones(len(seg), dtype=torch.bool)
    skipped[rows] = False
    assert full.grad[skipped].abs().max() == 0  # what is left out had no gradient at all


def test_no_sequence_with_gradient_keeps_the_shortest():
    keep, scale = sequences_with_gradient(torch.zeros(4), torch.tensor([6, 2, 9, 2]), "seq-mean-token-mean")
    assert keep == [1] and scale == pytest.approx(0.25)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="advantages and loss_tokens"):
        sequences_with_gradient(torch.zeros(4), torch.ones(3), "token-mean")


def _rollout(vocab: int = 61):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(12)]  # fmt: skip
    completions = [torch.randint(3, vocab, (int(torch.randint(1, 14, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(12)]  # fmt: skip
    return build_sequences(prompts, completions)


def _model_and_rollout(seed: int):
    """A tiny policy without MTP layers, 12 sequences and the policy's log-probs of them (per sequence,
    position-aligned; 0 off the completion tokens)."""
    model = PolicyModel(PolicyConfig.tiny(vocab_size=61, num_layers=1, num_mtp_layers=0))
    model.reset_parameters(seed=seed)
    seqs = _rollout()
    batch, _ = pack(seqs, 32)
    tokens = loss_tokens(batch)
    with torch.no_grad():
        logprobs = per_sequence(batch, tokens, packed_logprobs(model, batch, tokens, 1.0), len(seqs))
    return model, seqs, logprobs


class RecordingEngine(TrainEngine):
    """Keeps each step's gradients and the weights after it."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__(model, lr=lr)
        self.grads: list[list[torch.Tensor]] = []
        self.weights: list[list[torch.Tensor]] = []

    def step(self) -> float:
        self.grads.append([p.grad.clone() for p in self.model.parameters()])
        norm = super().step()
        self.weights.append([p.detach().clone() for p in self.model.parameters()])
        return norm


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("all_zero", [False, True])
def test_train_step_with_and_without_the_skip_update_alike(agg, all_zero):
    """Two optimizer steps (AdamW's momentum carries the first into the second), off-policy old log-probs. The
    gradients agree to fp32 rounding; AdamW's first steps turn a rounding difference on a near-zero gradient into
    a sign flip of a whole `lr`-sized update, so the weights are compared to 2 lr with a tiny lr."""
    lr = 1e-6
    model, seqs, logprobs = _model_and_rollout(seed=1)
    old = [lp - 0.05 for lp in logprobs]
    advantages = [torch.tensor([0.0, 1.0, -1.0, 0.0] * 3), torch.zeros(12) if all_zero else torch.randn(12)]
    advantages[1][::3] = 0.0

    runs = {}
    for skip in (False, True):
        twin = copy.deepcopy(model)
        engine = RecordingEngine(twin, lr=lr)
        cfg = GRPOConfig(agg=agg, beta=0.0, mtp_loss_coef=0.0, max_new_tokens=16, skip_zero_advantage=skip)
        stats = [grpo_train_step(twin, engine, seqs, old=old, ref=None, advantages=a, cfg=cfg, chunk_len=32)
                 for a in advantages]  # fmt: skip
        runs[skip] = (engine, stats)
    (plain, plain_stats), (skipping, skip_stats) = runs[False], runs[True]
    assert skip_stats[0]["train/skipped_seq_frac"] == pytest.approx(0.5)
    assert skip_stats[1]["train/skipped_seq_frac"] == pytest.approx(11 / 12 if all_zero else 4 / 12)
    assert plain_stats[1]["train/skipped_seq_frac"] == 0.0
    for a, b in zip(plain_stats, skip_stats, strict=True):
        assert b["loss/policy"] == pytest.approx(a["loss/policy"], rel=1e-5, abs=1e-7)
        assert b["loss/grad_norm"] == pytest.approx(a["loss/grad_norm"], rel=1e-4, abs=1e-7)
    for step in range(2):
        for g, h in zip(plain.grads[step], skipping.grads[step], strict=True):
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-7)
        for w, v in zip(plain.weights[step], skipping.weights[step], strict=True):
            torch.testing.assert_close(v, w, rtol=0.0, atol=2.5 * lr)
    # an all-zero batch still steps: the momentum of the first step moves the weights again
    moved = max((b - a).abs().max().item() for a, b in zip(skipping.weights[0], skipping.weights[1], strict=True))
    assert moved > 0.5 * lr


def test_kl_or_mtp_loss_trains_every_sequence():
    model = PolicyModel(PolicyConfig.tiny(vocab_size=61, num_layers=1, num_mtp_layers=1))
    model.reset_parameters(seed=2)
    seqs = _rollout()
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0] * 3)
    engine = TrainEngine(model, lr=1e-3)
    with_mtp = grpo_train_step(model, engine, seqs, old=None, ref=None, advantages=adv, chunk_len=32,
                               cfg=GRPOConfig(beta=0.0, mtp_loss_coef=0.1, max_new_tokens=16))  # fmt: skip
    assert with_mtp["train/skipped_seq_frac"] == 0.0
    batch, _ = pack(seqs, 32)
    tokens = loss_tokens(batch)
    with torch.no_grad():
        ref = per_sequence(batch, tokens, packed_logprobs(model, batch, tokens, 1.0), len(seqs))
    with_kl = grpo_train_step(model, engine, seqs, old=None, ref=ref, advantages=adv, chunk_len=32,
                              cfg=GRPOConfig(beta=0.01, mtp_loss_coef=0.0, max_new_tokens=16))  # fmt: skip
    assert with_kl["train/skipped_seq_frac"] == 0.0
    without = grpo_train_step(model, engine, seqs, old=None, ref=ref, advantages=adv, chunk_len=32,
                              cfg=GRPOConfig(beta=0.0, mtp_loss_coef=0.0, max_new_tokens=16))  # fmt: skip
    assert without["train/skipped_seq_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_micro_batches_accumulate_the_same_step(agg, beta):
    """Forward + backward chunk by chunk (gradients accumulated) is the step of the whole mini-batch, KL included."""
    model, seqs, logprobs = _model_and_rollout(seed=3)
    old, ref = [lp - 0.05 for lp in logprobs], [lp + 0.1 for lp in logprobs]
    adv = torch.tensor([0.0, 1.0, -1.0, 0.5] * 3)
    runs = {}
    for budget in (None, 32, 70):
        twin = copy.deepcopy(model)
        engine = RecordingEngine(twin, lr=1e-6)
        cfg = GRPOConfig(agg=agg, beta=beta, mtp_loss_coef=0.0, max_new_tokens=16)
        stats = grpo_train_step(twin, engine, seqs, old=old, ref=ref, advantages=adv, cfg=cfg, chunk_len=32,
                                micro_batch_tokens=budget)  # fmt: skip
        runs[budget] = (engine, stats)
    whole, whole_stats = runs[None]
    assert whole_stats["train/micro_batches"] == 1
    for budget in (32, 70):
        engine, stats = runs[budget]
        assert stats["train/micro_batches"] > 1
        for key in ("loss/policy", "loss/grad_norm", "loss/clip_frac", "loss/ratio_mean", "loss/kl_mean"):
            assert stats[key] == pytest.approx(whole_stats[key], rel=1e-4, abs=1e-7), key
        for g, h in zip(whole.grads[0], engine.grads[0], strict=True):
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-7)


def test_micro_batches_follow_the_packing_plan():
    from r1engine.trainer.grpo import micro_batches

    lengths = torch.tensor([30, 5, 20, 12, 28, 3, 9])
    groups = micro_batches(lengths, 32, 64)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert all(int(lengths[g].sum()) <= 64 for g in groups) and len(groups) > 1
    assert micro_batches(lengths, 32, None) == [list(range(7))]
    assert all(int(lengths[g].sum()) <= 32 for g in micro_batches(lengths, 32, 10))  # below a chunk: one chunk
