"""Reference GRPO math: KL estimators, clipped surrogate, aggregation weights, reference loss."""

from __future__ import annotations

import pytest
import torch

from r1engine.algo.kl import KL_ESTIMATORS, kl_estimate
from r1engine.algo.loss import aggregation_weights, clipped_surrogate, grpo_loss_reference, masked_mean


@pytest.mark.parametrize("k", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_values_and_grad(k):
    torch.manual_seed(1)
    logp = (-torch.rand(37, dtype=torch.float64) * 4).requires_grad_()
    ref = -torch.rand(37, dtype=torch.float64) * 4
    ref[:3] = torch.tensor([-40.0, 30.0, -25.0])  # outside low_var_kl's clamps
    kl = kl_estimate(logp, ref, k)
    d = ref - logp.detach()
    dc = d.clamp(-20, 20)
    want = {"k1": -d, "k2": 0.5 * d**2, "k3": d.exp() - d - 1, "low_var_kl": (dc.exp() - dc - 1).clamp(-10, 10)}[k]
    torch.testing.assert_close(kl.detach(), want)
    (g,) = torch.autograd.grad(kl.sum(), logp)
    grad = {"k1": torch.ones_like(d), "k2": -d, "k3": 1 - d.exp()}.get(k)
    if k == "low_var_kl":  # k3's gradient where no clamp is active, 0 where one is
        grad = torch.where((d.abs() < 20) & ((dc.exp() - dc - 1) < 10), 1 - d.exp(), torch.zeros_like(d))
    torch.testing.assert_close(g, grad)
    if k != "k1":
        assert (kl >= 0).all()


def test_kl_k3_unbiased_for_true_kl():
    # E_{x~p}[k3] = KL(p || q) for categorical p, q.
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(11, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(11, dtype=torch.float64), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    expected_k3 = (p * kl_estimate(p.log(), q.log(), "k3")).sum()
    torch.testing.assert_close(expected_k3, true_kl)


def test_kl_estimator_names():
    assert set(KL_ESTIMATORS) >= {"k1", "k2", "k3", "low_var_kl"}
    with pytest.raises(ValueError, match="kl_estimator: expected one of"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_clipped_surrogate_branches():
    ratio = torch.tensor([1.1, 1.5, 1.5, 0.5, 0.5, 5.0, 5.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -2.0, 2.0])
    s, clipped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(s, torch.tensor([1.1, 1.28, -1.5, -0.8, 0.5, -10.0, 2.56]))
    assert clipped.tolist() == [0, 1, 0, 1, 0, 0, 1]
    s, clipped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(s, torch.tensor([1.1, 1.28, -1.5, -0.8, 0.5, -6.0, 2.56]))
    assert clipped.tolist() == [0, 1, 0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="dual_clip: expected None, 0"):
        clipped_surrogate(ratio, adv, dual_clip=0.5)


def _mask():
    return torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)


def test_aggregation_weights_match_definitions():
    torch.manual_seed(3)
    mask = _mask()
    x = torch.randn(4, 5)
    seqs = [x[i][mask[i] > 0] for i in range(4) if mask[i].sum() > 0]
    want = torch.stack([s.mean() for s in seqs]).mean()
    torch.testing.assert_close((aggregation_weights(mask, "seq-mean-token-mean") * x).sum(), want)
    torch.testing.assert_close((aggregation_weights(mask, "token-mean") * x).sum(), x[mask > 0].mean())
    want = torch.stack([(x[i] * mask[i]).sum() for i in range(4)]).sum() / (4 * 5)
    torch.testing.assert_close((aggregation_weights(mask, "seq-mean-token-sum-norm") * x).sum(), want)
    want = torch.stack([(x[i] * mask[i]).sum() for i in range(4)]).sum() / (4 * 16)
    torch.testing.assert_close((aggregation_weights(mask, "seq-mean-token-sum-norm", max_len=16) * x).sum(), want)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_packed_segments_match_padded(agg):
    torch.manual_seed(4)
    mask = _mask()
    lengths = [4, 2, 3, 5]  # real tokens per sequence (mask zeros after prompt/padding inside them)
    rows = [(i, j) for i in range(4) for j in range(lengths[i])]
    seg = torch.tensor([i for i, _ in rows])
    pmask = torch.stack([mask[i, j] for i, j in rows])
    padded = aggregation_weights(mask, agg, max_len=5)
    packed = aggregation_weights(pmask, agg, max_len=5, segment_ids=seg)
    torch.testing.assert_close(packed, torch.stack([padded[i, j] for i, j in rows]))


def test_all_masked_gives_zero_weights_and_metrics():
    mask = torch.zeros(3, 4)
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        w = aggregation_weights(mask, agg)
        assert torch.equal(w, torch.zeros(3, 4))
    assert masked_mean(torch.randn(3, 4), mask) == 0


def test_aggregation_bad_input():
    with pytest.raises(ValueError, match="agg: expected one of"):
        aggregation_weights(_mask(), "sum")
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, T\] or \[N\]"):
        aggregation_weights(torch.ones(2, 2, 2), "token-mean")
    with pytest.raises(ValueError, match="segment_ids: expected an integer tensor of shape"):
        aggregation_weights(torch.ones(5), "seq-mean-token-mean", segment_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len: expected a positive int"):
        aggregation_weights(torch.ones(5), "seq-mean-token-sum-norm", max_len=0)


def test_reference_loss_on_policy_gradient_is_minus_advantage():
    # On-policy, no KL: d loss / d logp_t = -w_t * A (ratio 1), so the logits gradient is -w*A*(onehot - p).
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (2, 3))
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    mask = torch.ones(2, 3)
    loss, metrics = grpo_loss_reference(logits, targets, adv, mask, agg="token-mean")
    (g,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits.detach().float(), -1)
    onehot = torch.nn.functional.one_hot(targets, 13).float()
    want = -(adv.float()[:, None, None] / 6) * (onehot - p)
    torch.testing.assert_close(g.float(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.float(), -(adv.float().mean()))
    assert metrics.ratio_mean == 1 and metrics.clip_frac == 0 and metrics.num_tokens == 6
