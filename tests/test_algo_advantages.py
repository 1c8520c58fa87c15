"""Advantage estimators (GRPO / Dr.GRPO / RLOO / REINFORCE++ baseline / GAE) and their registry: explicit values,
hand-written formulas and hypothesis properties."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1engine.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    compute_advantages,
    group_advantages,
    register_advantage_estimator,
    token_advantages,
)
from r1engine.algo.gae import gae_advantages, whiten

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


# ------------------------------------------------------------------------------------------------- the registry


def test_registry_holds_the_built_in_estimators():
    assert {"grpo", "drgrpo", "rloo", "reinforce_pp_baseline", "gae"} <= set(ADVANTAGE_ESTIMATORS)
    for name in ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline"):
        est = ADVANTAGE_ESTIMATORS[name]
        assert (est.name, est.level, est.needs_values) == (name, "sequence", False)
    gae = ADVANTAGE_ESTIMATORS["gae"]
    assert (gae.level, gae.needs_values) == ("token", True)
    assert ADVANTAGE_ESTIMATORS["grpo"].min_group_size == 2 and ADVANTAGE_ESTIMATORS["rloo"].min_group_size == 1


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_registry_entries_are_group_advantages(name):
    r = torch.tensor([0.5, 2.0, -1.0, 3.0, 3.0, 3.0, 7.0, 1.0, 4.0])
    out = compute_advantages(name, AdvantageInputs(r, 3))
    assert out.returns is None
    assert torch.equal(out.advantages, group_advantages(r, 3, method=name))
    grouped = compute_advantages(name, AdvantageInputs(r.view(3, 3), 3)).advantages
    assert grouped.shape == (3, 3) and torch.equal(grouped.reshape(-1), out.advantages)


@pytest.fixture
def registered():
    """Names registered by a test, removed from the registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        ADVANTAGE_ESTIMATORS.pop(name, None)


def test_register_a_custom_estimator(registered):
    registered += ["test_best_of_group", "test_bad_shape"]

    @register_advantage_estimator("test_best_of_group", min_group_size=2)
    def best_of_group(x: AdvantageInputs) -> AdvantageOutput:
        r = x.grouped()
        return AdvantageOutput((r == r.max(dim=1, keepdim=True).values).double())

    r = torch.tensor([1, 3, 2, 5, 5, 0])
    adv = compute_advantages("test_best_of_group", AdvantageInputs(r, 3)).advantages
    assert adv.dtype == torch.float32 and torch.equal(adv, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]))
    assert torch.equal(group_advantages(r, 3, method="test_best_of_group"), adv)  # the plain function reaches it too
    assert ADVANTAGE_ESTIMATORS["test_best_of_group"].min_group_size == 2
    with pytest.raises(ValueError, match="'test_best_of_group' is already registered"):
        register_advantage_estimator("test_best_of_group")(lambda x: AdvantageOutput(x.rewards))

    @register_advantage_estimator("test_bad_shape")
    def bad_shape(x: AdvantageInputs) -> AdvantageOutput:
        return AdvantageOutput(x.rewards[:-1])

    with pytest.raises(ValueError, match=r"advantage estimator 'test_bad_shape': expected advantages of shape \[6\]"):
        compute_advantages("test_bad_shape", AdvantageInputs(r, 3))


def test_registry_errors_name_the_argument():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match=r"advantage: expected one of \[.*'reinforce_pp_baseline'.*\], got 'ppo'"):
        compute_advantages("ppo", AdvantageInputs(r, 2))
    with pytest.raises(ValueError, match="values: the advantage estimator 'gae' needs a value model's values"):
        compute_advantages("gae", AdvantageInputs(r, 2, lengths=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="lengths: the token-level advantage estimator 'gae' needs"):
        compute_advantages("gae", AdvantageInputs(r, 2, values=torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="method: 'gae' gives per-token advantages"):
        group_advantages(r, 2, method="gae")
    with pytest.raises(ValueError, match=r"lengths: expected an integer tensor of shape \[2\]"):
        AdvantageInputs(r, 2, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="lam: expected a value in"):
        AdvantageInputs(r, 2, lam=1.5)
    with pytest.raises(ValueError, match="level: expected"):
        register_advantage_estimator("test_never", level="chunk")


# ------------------------------------------------------------------------------------ REINFORCE++ with baseline


def _rpp_reference(rewards: list[float], g: int, lengths: list[int] | None = None, eps: float = 1e-6) -> torch.Tensor:
    """verl's reinforce_plus_plus_baseline in plain Python: the group mean subtracted (a group of one keeps its
    reward), then (x - mean) / (std + eps) over the batch, each completion counted once per token (once without
    lengths), Bessel-corrected."""
    xs: list[float] = []
    for i in range(0, len(rewards), g):
        group = rewards[i : i + g]
        base = sum(group) / g if g > 1 else 0.0
        xs += [r - base for r in group]
    w = [1.0] * len(xs) if lengths is None else [float(n) for n in lengths]
    total = sum(w)
    mean = sum(wi * x for wi, x in zip(w, xs, strict=True)) / total
    var = sum(wi * (x - mean) ** 2 for wi, x in zip(w, xs, strict=True)) / (total - 1)
    return torch.tensor([(x - mean) / (math.sqrt(var) + eps) for x in xs])


def _rpp(rewards, g, lengths=None, **kw) -> torch.Tensor:
    lengths = None if lengths is None else torch.tensor(lengths)
    return compute_advantages("reinforce_pp_baseline", AdvantageInputs(rewards, g, lengths=lengths, **kw)).advantages


def test_reinforce_pp_baseline_explicit_values():
    # groups [1, 0, 0] and [3, 5, 4]: centred [2/3, -1/3, -1/3, -1, 1, 0], batch mean 0, sum of squares 8/3 over 5
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 4.0])
    want = torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 0.0]) / (math.sqrt(8 / 15) + 1e-6)
    torch.testing.assert_close(_rpp(r, 3), want)
    torch.testing.assert_close(_rpp(r, 3), _rpp_reference(r.tolist(), 3))
    # groups of one: no baseline, the rewards whitened over the batch (REINFORCE++ without a baseline)
    r1 = torch.tensor([1.0, 0.0, 2.0, 1.0])
    torch.testing.assert_close(_rpp(r1, 1), (r1 - 1.0) / (math.sqrt(2 / 3) + 1e-6))
    # a batch of all-equal groups, and a batch of equal rewards: exactly 0
    assert torch.equal(_rpp(torch.tensor([2.0, 2.0, -1.0, -1.0]), 2), torch.zeros(4))
    assert torch.equal(_rpp(torch.full((3,), 0.7), 1), torch.zeros(3))
    # no completion with a loss token: nothing to whiten over
    assert torch.equal(_rpp(r, 3, [0] * 6), torch.zeros(6))


@pytest.mark.parametrize("g", [1, 2, 4])
def test_reinforce_pp_baseline_token_weighted_like_verl(g):
    gen = torch.Generator().manual_seed(g)
    b = 12
    rewards = torch.randint(0, 3, (b,), generator=gen).float() + 0.25 * torch.rand(b, generator=gen)
    rewards[:g] = rewards[0]  # one all-equal group
    lengths = torch.randint(1, 9, (b,), generator=gen)
    lengths[1 % b] = 0  # a completion without loss tokens does not count
    adv = _rpp(rewards, g, lengths.tolist())
    torch.testing.assert_close(adv, _rpp_reference(rewards.tolist(), g, lengths.tolist()), rtol=1e-5, atol=1e-6)
    # verl's form: the centred score broadcast over the response tokens, then masked_whiten (token mean, Bessel
    # variance, (x - mean) * rsqrt(var + 1e-8)); every token of a completion carries its sequence's value
    grouped = rewards.double().view(-1, g)
    centred = (grouped - (grouped.mean(1, keepdim=True) if g > 1 else 0.0)).reshape(-1)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).double()
    tiled = centred[:, None] * mask
    n = mask.sum()
    mean = (tiled * mask).sum() / n
    var = (((tiled - mean) ** 2) * mask).sum() / n * n / (n - 1)
    verl = ((tiled - mean) * torch.rsqrt(var + 1e-8))[:, 0]
    keep = lengths > 0
    torch.testing.assert_close(adv[keep].double(), verl[keep], rtol=1e-5, atol=1e-5)
    if g > 1:  # the batch mean is subtracted: an all-equal group is 0 only where the token-weighted mean is
        flat = torch.full((g,), float(-mean * torch.rsqrt(var + 1e-8)), dtype=torch.float64)
        torch.testing.assert_close(adv[:g].double(), flat, rtol=1e-5, atol=1e-6)
        assert adv[0] != 0


def test_reinforce_pp_baseline_whitens_over_every_rank():
    """Two ranks, each with half of the batch's groups, reduce their statistics: each gets its rows of the
    advantages of the whole batch."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (16,), generator=gen).float()
    lengths = torch.randint(1, 20, (16,), generator=gen)
    whole = _rpp(rewards, 4, lengths.tolist())
    barrier = threading.Barrier(2)
    slots: list[list[float] | None] = [None, None]

    def sum_on(rank):
        def reduce(values):
            slots[rank] = list(values)
            barrier.wait()
            total = [a + b for a, b in zip(slots[0], slots[1], strict=True)]
            barrier.wait()
            return total

        return reduce

    results: dict[int, torch.Tensor] = {}

    def rank_main(rank):
        part = slice(8 * rank, 8 * rank + 8)
        results[rank] = _rpp(rewards[part], 4, lengths[part].tolist(), sum_across_ranks=sum_on(rank))

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    torch.testing.assert_close(torch.cat([results[0], results[1]]), whole)
    assert not torch.allclose(_rpp(rewards[:8], 4, lengths[:8].tolist()), whole[:8])  # alone it would differ


# ---------------------------------------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("whiten_advantages", [True, False])
def test_gae_entry_is_gae_then_whitening(whiten_advantages):
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([5, 1, 7, 0, 3])
    values = torch.randn(5, 7, generator=gen)
    token_rewards = 0.1 * torch.randn(5, 7, generator=gen)
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    inputs = AdvantageInputs(
        rewards, 1, lengths=lengths, values=values, token_rewards=token_rewards, gamma=0.99, lam=0.9,
        whiten=whiten_advantages,
    )  # fmt: skip
    out = compute_advantages("gae", inputs)
    adv, returns = gae_advantages(values, rewards, lengths, gamma=0.99, lam=0.9, token_rewards=token_rewards)
    valid = torch.arange(7)[None, :] < lengths[:, None]
    assert torch.equal(out.returns, returns)
    assert torch.equal(out.advantages, whiten(adv, valid) if whiten_advantages else adv)
    assert (out.pre_whitening is not None) == whiten_advantages
