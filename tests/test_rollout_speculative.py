"""The exact acceptance rule alone: sampled tokens follow the target distribution p for any draft distribution q."""

from __future__ import annotations

import pytest
import torch

from r1engine.models.toy import chi_square_pvalue
from r1engine.rollout.sampling import SamplingConfig, processed_probs, sample_from
from r1engine.rollout.speculative import verify_drafts


def _rand_probs(gen: torch.Generator, shape, sharp: float) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=gen) * sharp, -1)


@pytest.mark.parametrize("greedy_draft", [True, False])
def test_first_token_distribution_is_target(greedy_draft):
    """Token emitted at the first speculative position (accepted draft or replacement) ~ p_1 exactly."""
    gen = torch.Generator().manual_seed(11)
    v, n = 7, 60000
    p = _rand_probs(gen, (1, 2, v), 1.5).expand(n, 2, v).contiguous()
    q = _rand_probs(gen, (1, 1, v), 1.5).expand(n, 1, v).contiguous()
    if greedy_draft:
        drafts = q[:, 0].argmax(-1, keepdim=True)
        res = verify_drafts(drafts, None, p, gen)
    else:
        drafts = sample_from(q[:, 0], gen)[:, None]
        res = verify_drafts(drafts, q, p, gen)
    first = torch.where(res.num_accepted > 0, drafts[:, 0], res.next_token)
    counts = {(t,): int(c) for t, c in enumerate(torch.bincount(first, minlength=v).tolist())}
    probs = {(t,): float(x) for t, x in enumerate(p[0, 0].tolist())}
    _, pval, _ = chi_square_pvalue(counts, probs)
    assert pval > 1e-4
    acc = res.num_accepted.float().mean().item()
    expected = float(p[0, 0, drafts[0, 0]]) if greedy_draft else float(torch.minimum(p[0, 0], q[0, 0]).sum())
    assert abs(acc - expected) < 0.02  # acceptance rate = sum min(p, q) (= p(draft) for a greedy drafter)


def test_two_drafts_joint_distribution():
    """With k=2 drafts the emitted pair (positions 1, 2) follows p_1 x p_2 exactly (contexts fixed)."""
    gen = torch.Generator().manual_seed(12)
    v, n = 5, 80000
    p = _rand_probs(gen, (1, 3, v), 1.0).expand(n, 3, v).contiguous()
    q = _rand_probs(gen, (1, 2, v), 2.0).expand(n, 2, v).contiguous()
    drafts = sample_from(q, gen)
    res = verify_drafts(drafts, q, p, gen)
    a, y = res.num_accepted, res.next_token
    first = torch.where(a >= 1, drafts[:, 0], y)
    second = torch.where(a >= 2, drafts[:, 1], y)
    keep = a >= 1  # the second token comes from this verify step only when the first draft was accepted
    pairs = first[keep] * v + second[keep]
    counts = {(t,): int(c) for t, c in enumerate(torch.bincount(pairs, minlength=v * v).tolist())}
    # condition on acceptance of draft 1: first token = d1 ~ min(p1, q1) normalised, second ~ p2
    acc1 = torch.minimum(p[0, 0], q[0, 0])
    acc1 = acc1 / acc1.sum()
    probs = {(i * v + j,): float(acc1[i] * p[0, 1, j]) for i in range(v) for j in range(v)}
    _, pval, _ = chi_square_pvalue(counts, probs)
    assert pval > 1e-4


def test_processed_probs_filters():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 11, generator=gen)
    p = processed_probs(logits, SamplingConfig(temperature=0.7, top_k=3))
    assert ((p > 0).sum(-1) == 3).all() and torch.allclose(p.sum(-1), torch.ones(4))
    p = processed_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    full = torch.softmax(logits, -1)
    kept = p > 0
    assert ((full * kept).sum(-1) >= 0.5 - 1e-6).all()  # smallest set reaching top_p mass
    assert torch.equal(processed_probs(logits, SamplingConfig(temperature=0)).argmax(-1), logits.argmax(-1))
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
