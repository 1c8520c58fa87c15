"""GAE, whitening and the clipped value loss against plain-Python references written from the definitions."""

from __future__ import annotations

import pytest
import torch

from r1engine.algo.gae import clipped_value_loss, discounted_reverse_cumsum, gae_advantages, whiten


def _gae_reference(values, reward, token_rewards, gamma, lam):
    """One sequence, token by token, straight from delta_t = r_t + gamma V_{t+1} - V_t (V_L = 0)."""
    n = len(values)
    r = list(token_rewards)
    if n:
        r[n - 1] += reward
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = r[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def _batch(lengths, width, seed):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    values = torch.randn(b, width, generator=gen, dtype=torch.float64)
    token_rewards = 0.1 * torch.randn(b, width, generator=gen, dtype=torch.float64)
    rewards = torch.randn(b, generator=gen, dtype=torch.float64) * 2
    return values, rewards, torch.tensor(lengths), token_rewards


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("with_token_rewards", [False, True])
def test_gae_matches_reference(lam, gamma, with_token_rewards):
    lengths = [7, 1, 13, 0, 5, 13]  # odd lengths, a single token, an empty row, the full width
    width = 13
    values, rewards, lens, token_rewards = _batch(lengths, width, seed=3)
    values[0, 7:] = 123.0  # garbage in the padding must not leak in
    adv, ret = gae_advantages(
        values.float(),
        rewards.float(),
        lens,
        gamma=gamma,
        lam=lam,
        token_rewards=token_rewards.float() if with_token_rewards else None,
    )
    assert adv.shape == ret.shape == (len(lengths), width) and adv.dtype == torch.float32
    for i, n in enumerate(lengths):
        tr = token_rewards[i, :n].tolist() if with_token_rewards else [0.0] * n
        ref_adv, ref_ret = _gae_reference(values[i, :n].tolist(), float(rewards[i]), tr, gamma, lam)
        torch.testing.assert_close(adv[i, :n], torch.tensor(ref_adv, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[i, :n], torch.tensor(ref_ret, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)


def test_lambda_one_gamma_one_is_monte_carlo():
    """lambda = gamma = 1: every token's return is the final reward and its advantage is reward - value."""
    lengths = [9, 3, 11]
    values, rewards, lens, _ = _batch(lengths, 11, seed=5)
    adv, ret = gae_advantages(values.float(), rewards.float(), lens, gamma=1.0, lam=1.0)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(ret[i, :n], rewards[i].float().expand(n), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(adv[i, :n], (rewards[i] - values[i, :n]).float(), rtol=1e-6, atol=1e-6)


def test_lambda_zero_is_one_step_td_error():
    values, rewards, lens, _ = _batch([6], 6, seed=11)
    adv, _ = gae_advantages(values.float(), rewards.float(), lens, gamma=0.99, lam=0.0)
    expected = torch.cat([0.99 * values[0, 1:] - values[0, :-1], (rewards[0] - values[0, -1]).view(1)])
    torch.testing.assert_close(adv[0], expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [1, 4, 7, 128])
@pytest.mark.parametrize("discount", [0.0, 0.5, 0.95, 1.0])
def test_discounted_reverse_cumsum_blocks(block, discount):
    x = torch.randn(3, 19, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.zeros_like(x)
    running = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(19)):
        running = x[:, t] + discount * running
        expected[:, t] = running
    torch.testing.assert_close(discounted_reverse_cumsum(x, discount, block=block), expected)


def test_long_sequence_uses_blocks_exactly():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = discounted_reverse_cumsum(x, 0.999, block=64)
    torch.testing.assert_close(out[:, 0], (x * 0.999 ** torch.arange(1000, dtype=torch.float64)).sum(1))


def test_whiten_over_mask_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    out = whiten(x, mask)
    sel = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    ref = (sel - sel.mean()) / sel.std(unbiased=False)
    torch.testing.assert_close(out[mask.bool()], ref, rtol=1e-6, atol=1e-6)
    assert out[0, 3] == 0 and out[1, 2] == 0 and out[1, 3] == 0
    scaled = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(scaled[mask.bool()], sel / sel.std(unbiased=False), rtol=1e-6, atol=1e-6)
    assert torch.all(whiten(x, torch.zeros_like(mask)) == 0)


def test_clipped_value_loss_reference_and_gradient():
    gen = torch.Generator().manual_seed(7)
    old = torch.randn(4, 5, generator=gen)
    values = (old + 0.5 * torch.randn(4, 5, generator=gen)).requires_grad_(True)
    returns = torch.randn(4, 5, generator=gen)
    mask = (torch.rand(4, 5, generator=gen) > 0.3).float()
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    terms, active = [], []
    for v, o, r, m in zip(values.flatten().tolist(), old.flatten().tolist(), returns.flatten().tolist(),
                          mask.flatten().tolist(), strict=True):  # fmt: skip
        if not m:
            continue
        vc = min(max(v, o - 0.2), o + 0.2)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        active.append((vc - r) ** 2 > (v - r) ** 2)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)
    assert clip_frac.item() == pytest.approx(sum(active) / len(active))
    loss.backward()
    assert torch.all(values.grad[mask == 0] == 0) and values.grad.abs().sum() > 0
    plain, zero = clipped_value_loss(values.detach(), old, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * float(((values.detach() - returns) ** 2 * mask).sum() / mask.sum()))
    assert zero.item() == 0


def test_bad_inputs_name_the_argument():
    values = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="lengths"):
        gae_advantages(values, torch.zeros(2), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="rewards"):
        gae_advantages(values, torch.zeros(3), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(values, torch.zeros(2), torch.tensor([4, 1]), lam=1.5)
    with pytest.raises(ValueError, match="token_rewards"):
        gae_advantages(values, torch.zeros(2), torch.tensor([4, 1]), token_rewards=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="clip_range"):
        clipped_value_loss(values, values, values, values, clip_range=0.0)
    with pytest.raises(ValueError, match="returns"):
        clipped_value_loss(values, values, torch.zeros(3), values)
