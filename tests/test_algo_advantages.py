"""Group advantages (GRPO / Dr.GRPO / RLOO): explicit values and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1engine.algo.advantages import group_advantages, token_advantages

finite_rewards = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)


def test_grpo_matches_definition_unbiased_std():
    torch.manual_seed(0)
    r = torch.randn(5, 7)
    adv = group_advantages(r, 7)
    want = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    flat = group_advantages(r.reshape(-1), 7)
    assert flat.shape == (35,)
    torch.testing.assert_close(flat.reshape(5, 7), adv)


def test_drgrpo_and_rloo_definitions():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])
    torch.testing.assert_close(group_advantages(r, 3, method="drgrpo"), r - torch.tensor([1 / 3] * 3 + [3.0] * 3))
    rloo = group_advantages(r, 3, method="rloo")
    want = torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5, 1 - 4.0, 3 - 3.0, 5 - 2.0])
    torch.testing.assert_close(rloo, want)


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_equal_groups_and_singletons_are_exactly_zero(method):
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.9])
    adv = group_advantages(r, 3, method=method)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3:].abs().sum() > 0
    assert torch.equal(group_advantages(torch.tensor([3.0, -2.0, 5.5]), 1, method=method), torch.zeros(3))


def test_integer_and_bool_rewards_give_float32():
    adv = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert adv.dtype == torch.float32
    assert adv[2:].abs().sum() == 0 and adv[0] > 0 > adv[1]
    assert group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(7), 3), {}, "rewards: expected a length divisible by group_size=3"),
        ((torch.zeros(2, 4), 3), {}, r"rewards: expected shape \[B, group_size=3\]"),
        ((torch.zeros(2, 2, 2), 2), {}, "rewards: expected shape"),
        ((torch.zeros(4), 0), {}, "group_size: expected a positive int"),
        ((torch.zeros(4), 2), {"method": "ppo"}, "method: expected one of"),
        ((torch.tensor([1.0, float("nan")]), 2), {}, "rewards: expected finite values"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args, **kwargs)


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(st.lists(finite_rewards, min_size=4, max_size=4), min_size=1, max_size=6),
    method=st.sampled_from(["grpo", "drgrpo", "rloo"]),
)
def test_property_finite_zero_mean(groups, method):
    r = torch.tensor(groups, dtype=torch.float32)
    adv = group_advantages(r, 4, method=method)
    assert adv.shape == r.shape
    assert torch.isfinite(adv).all(), (r, adv)
    # zero mean per group (relative to the group's reward scale for the non-normalized methods)
    scale = r.double().abs().amax(dim=1).clamp(min=1.0)
    if method == "grpo":
        scale = torch.ones_like(scale) * 4.0
    assert (adv.double().sum(dim=1).abs() <= 1e-5 * scale * 4).all(), (r, adv)
    if method == "grpo":  # |A| <= (G-1)/sqrt(G) for the unbiased std
        assert (adv.abs() <= (3 / math.sqrt(4)) + 1e-4).all()


@settings(max_examples=100, deadline=None)
@given(
    value=finite_rewards,
    g=st.integers(min_value=1, max_value=9),
    b=st.integers(min_value=1, max_value=4),
    method=st.sampled_from(["grpo", "drgrpo", "rloo"]),
)
def test_property_all_equal_groups_zero(value, g, b, method):
    r = torch.full((b * g,), value, dtype=torch.float32)
    assert torch.equal(group_advantages(r, g, method=method), torch.zeros(b * g))


@settings(max_examples=100, deadline=None)
@given(
    base=st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=6, max_size=6),
    log_scale=st.floats(min_value=-2.0, max_value=20.0),
    shift=st.floats(min_value=-100.0, max_value=100.0),
)
def test_property_grpo_scale_and_shift_invariant(base, log_scale, shift):
    r = torch.tensor(base, dtype=torch.float64)
    if float(r.std()) < 1e-2:  # too close to an all-equal group: eps dominates
        return
    c = 10.0**log_scale
    a = group_advantages(r, 6)
    b = group_advantages(r * c + shift, 6)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(tiny=st.floats(min_value=1e-30, max_value=1e-12), g=st.integers(min_value=2, max_value=8))
def test_property_tiny_rewards_no_nan(tiny, g):
    r = torch.arange(g, dtype=torch.float32) * tiny
    for method in ("grpo", "drgrpo", "rloo"):
        adv = group_advantages(r, g, method=method)
        assert torch.isfinite(adv).all()
        assert adv.abs().max() < 1e-3  # eps keeps tiny spreads from being blown up


def test_token_advantages_broadcast():
    adv = torch.tensor([1.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(token_advantages(adv, mask), torch.tensor([[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]]))
    torch.testing.assert_close(token_advantages(adv, num_tokens=2), torch.tensor([[1.5, 1.5], [-2.0, -2.0]]))
    seg = torch.tensor([0, 0, 1, 1, 1])
    torch.testing.assert_close(token_advantages(adv, segment_ids=seg), torch.tensor([1.5, 1.5, -2.0, -2.0, -2.0]))
    with pytest.raises(ValueError, match=r"mask: expected shape \[B=2, T\]"):
        token_advantages(adv, torch.ones(3, 4))
