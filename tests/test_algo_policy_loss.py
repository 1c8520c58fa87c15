"""The GRPO loss family (GSPO, CISPO, rollout-mismatch correction, KL variants, entropy bonus) through one
LossParams: every loss path against formulas written here the way the peers write them (TRL's `_compute_loss`
shape: padded [B, T] tensors, loss and gradient), plus the parameter object's checks and the registries."""

from __future__ import annotations

import math

import pytest
import torch

from r1engine import ops
from r1engine.algo.loss import grpo_loss_reference, token_entropy, token_logprobs
from r1engine.algo.policy_loss import POLICY_LOSSES, LossParams, register_policy_loss

B, T, V = 3, 6, 211


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampler = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    return logits, targets, adv, mask, old, ref, sampler


def peer_loss(logits, targets, adv, mask, old, ref, sampler, p: LossParams):
    """The loss as TRL's GRPOTrainer._compute_loss writes it (plus verl's low_var_kl and the entropy bonus)."""
    z = logits / p.temperature
    logp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
    log_ratio = logp - old
    if p.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_w)
    a = adv[:, None]
    if p.policy_loss == "cispo":
        per_token = -torch.clamp(coef_1, max=p.cispo_max_ratio).detach() * a * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - p.eps_low, 1 + p.eps_high)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
    if p.rollout_correction is not None:
        log_rho = (old - sampler) * mask
        if p.rollout_correction_level == "sequence":
            log_rho = log_rho.sum(-1, keepdim=True)
        rho = torch.exp(log_rho)
        lo, hi = p.rollout_correction_min, p.rollout_correction_max
        w = rho.clamp(lo, hi) if p.rollout_correction == "truncate" else rho * ((rho >= lo) & (rho <= hi))
        per_token = per_token * w
    if p.beta:
        d = ref - logp
        if p.kl_estimator == "low_var_kl":
            d = d.clamp(-20, 20)
            kl = (torch.exp(d) - d - 1).clamp(-10, 10)
        else:
            kl = torch.exp(d) - d - 1
        if p.kl_bias_correction:
            kl = kl * coef_1
        per_token = per_token + p.beta * kl
    if p.entropy_coef:
        ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        per_token = per_token - p.entropy_coef * ent
    if p.agg == "token-mean":
        return (per_token * mask).sum() / mask.sum()
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


VARIANTS = {
    "grpo": {},
    "dapo_clip_higher": dict(eps_high=0.28, agg="token-mean"),
    "gspo": dict(importance_sampling_level="sequence", eps_low=3e-4, eps_high=4e-4),
    "gspo_wide": dict(importance_sampling_level="sequence"),
    "cispo": dict(policy_loss="cispo", cispo_max_ratio=1.3, agg="token-mean"),
    "kl_k3": dict(beta=0.1),
    "low_var_kl_bias_corrected": dict(beta=0.1, kl_estimator="low_var_kl", kl_bias_correction=True),
    "tis_token": dict(rollout_correction="truncate", rollout_correction_max=1.5),
    "tis_sequence": dict(rollout_correction="truncate", rollout_correction_level="sequence"),
    "mis_token": dict(rollout_correction="mask", rollout_correction_min=0.5, rollout_correction_max=1.5),
    "mis_sequence": dict(rollout_correction="mask", rollout_correction_level="sequence", rollout_correction_max=3.0),
    "entropy_bonus": dict(entropy_coef=0.05, temperature=0.7),
    "everything": dict(
        importance_sampling_level="sequence",
        beta=0.05,
        kl_bias_correction=True,
        entropy_coef=0.01,
        rollout_correction="truncate",
        eps_high=0.28,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_matches_the_peer_formula(name):
    logits, targets, adv, mask, old, ref, sampler = _batch(1)
    p = LossParams(**VARIANTS[name])
    x1 = logits.clone().requires_grad_()
    want = peer_loss(x1, targets, adv, mask, old, ref, sampler, p)
    (g_want,) = torch.autograd.grad(want, x1)
    x2 = logits.clone().requires_grad_()
    got, metrics = grpo_loss_reference(x2, targets, adv, mask, old, ref, params=p, sampler_logprobs=sampler)
    (g_got,) = torch.autograd.grad(got, x2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-7)
    assert metrics.num_tokens == mask.sum()
    assert (metrics.entropy_mean is not None) == (p.entropy_coef != 0)
    assert (metrics.is_ratio_mean is not None) == (p.rollout_correction is not None)


def _packed(logits, targets, adv, mask, old, ref, sampler):
    """The padded batch as packed tokens (every position of every row, in order) with segment ids."""
    seg = torch.arange(B).repeat_interleave(T)
    flat = lambda t: t.reshape(-1)  # noqa: E731
    return logits.reshape(B * T, V), flat(targets), adv, flat(mask), flat(old), flat(ref), flat(sampler), seg


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("path", ["cpp", "torch", "linear"])
def test_fused_paths_match_the_reference_packed(name, path):
    logits, targets, adv, mask, old, ref, sampler = _batch(2)
    p = LossParams(**VARIANTS[name])
    lg, tg, ad, mk, ol, rf, sp, seg = _packed(logits.float(), targets, adv.float(), mask.float(), old.float(),
                                                ref.float(), sampler.float())  # fmt: skip
    x_ref = lg.clone().requires_grad_()
    want, m_want = grpo_loss_reference(x_ref, tg, ad, mk, ol, rf, params=p, sampler_logprobs=sp, segment_ids=seg)
    (g_want,) = torch.autograd.grad(want, x_ref)
    common = dict(params=p, sampler_logprobs=sp, segment_ids=seg)
    if path == "linear":
        g = torch.Generator().manual_seed(5)
        w = torch.randn(V, 16, generator=g)
        h = torch.linalg.lstsq(w, lg.T).solution.T.contiguous()  # hidden states whose logits are close to lg
        hidden = h.clone().requires_grad_()
        x_ref = (h @ w.T).clone().requires_grad_()
        want, m_want = grpo_loss_reference(x_ref, tg, ad, mk, ol, rf, **common)
        (g_logits,) = torch.autograd.grad(want, x_ref)
        got, m_got = ops.linear_grpo_loss(hidden, w, tg, ad, mk, ol, rf, backend="torch", **common)
        (g_hidden,) = torch.autograd.grad(got, hidden)
        torch.testing.assert_close(g_hidden, g_logits @ w, rtol=1e-4, atol=1e-6)
    else:
        x = lg.clone().requires_grad_()
        got, m_got = ops.grpo_loss(x, tg, ad, mk, ol, rf, backend=path, **common)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for field in ("clip_frac", "kl_mean", "ratio_mean", "entropy_mean", "is_ratio_mean", "is_corrected_frac"):
        a, b = getattr(m_got, field), getattr(m_want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gspo_gives_every_token_of_a_sequence_the_same_ratio_and_clip():
    logits, targets, adv, mask, old, ref, _ = _batch(3)
    logp = token_logprobs(logits, targets)
    seq_ratio = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    p = LossParams(importance_sampling_level="sequence")
    _, m = grpo_loss_reference(logits, targets, adv, mask, old, params=p)
    want = ((seq_ratio[:, None] * mask).sum() / mask.sum()).float()
    torch.testing.assert_close(m.ratio_mean, want)


def test_cispo_keeps_a_gradient_where_ppo_clip_has_none():
    # A token far above the clip range with a positive advantage: PPO-clip's gradient is 0, CISPO's is not.
    x = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    t, adv, mask = torch.tensor([0]), torch.tensor([1.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    old = torch.tensor([math.log(0.2) - 2.0], dtype=torch.float64)  # ratio = e^2 > 1 + eps_high
    (g_ppo,) = torch.autograd.grad(grpo_loss_reference(x, t, adv, mask, old).loss, x)
    (g_cispo,) = torch.autograd.grad(grpo_loss_reference(x, t, adv, mask, old, policy_loss="cispo").loss, x)
    assert g_ppo.abs().max() == 0 and g_cispo.abs().max() > 0


def test_entropy_bonus_raises_the_entropy():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 50, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 50, (8,), generator=g)
    before = token_entropy(x.detach()).mean()
    opt = torch.optim.SGD([x], lr=8.0)  # the loss averages over the 8 tokens
    for _ in range(20):
        opt.zero_grad()
        ops.grpo_loss(x, t, torch.zeros(8), torch.ones(8), entropy_coef=1.0, backend="cpp").loss.backward()
        opt.step()
    assert token_entropy(x.detach()).mean() > before + 0.5


def test_masked_importance_sampling_drops_far_sequences():
    logits, targets, adv, mask, old, ref, sampler = _batch(5)
    sampler = old.clone()
    sampler[1] = old[1] - 5.0  # row 1's sampler drifted: rho = e^5 per token
    p = LossParams(rollout_correction="mask", rollout_correction_level="sequence", rollout_correction_max=2.0)
    x = logits.clone().requires_grad_()
    out = grpo_loss_reference(x, targets, adv, mask, old, params=p, sampler_logprobs=sampler)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
    torch.testing.assert_close(out.metrics.is_corrected_frac.double(), mask[1].sum() / mask.sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy_loss="sapo"), "policy_loss: expected one of"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level: expected one of"),
        (dict(kl_estimator="k4"), "kl_estimator: expected one of"),
        (dict(rollout_correction="clip"), "rollout_correction: expected one of"),
        (dict(rollout_correction_min=2.0, rollout_correction_max=1.0), "expected min < max"),
        (dict(cispo_max_ratio=0.0), "cispo_max_ratio: expected a finite value > 0"),
        (dict(entropy_coef=float("nan")), "entropy_coef: expected a finite value"),
        (dict(dual_clip=0.5), "dual_clip: expected None, 0 \\(off\\) or a finite value > 1"),
        (dict(policy_loss="cispo", importance_sampling_level="sequence"), "does not combine"),
        (dict(max_len=0), "max_len: expected a positive int"),
    ],
)
def test_loss_params_name_the_bad_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossParams(**kwargs)


def test_bad_settings_and_missing_inputs_are_named_at_the_entry_points():
    logits, targets, adv, mask, old, ref, _ = _batch(6)
    with pytest.raises(TypeError, match="unexpected loss setting\\(s\\) \\['epsilon'\\]"):
        ops.grpo_loss(logits.float(), targets, adv.float(), mask.float(), epsilon=0.2)
    with pytest.raises(ValueError, match="sampler_logprobs: rollout_correction='truncate' needs"):
        ops.grpo_loss(logits.float(), targets, adv.float(), mask.float(), old.float(), rollout_correction="truncate")
    with pytest.raises(ValueError, match="segment_ids: importance_sampling_level='sequence'"):
        n = B * T
        ops.grpo_loss(logits.float().reshape(n, V), targets.reshape(n), torch.zeros(n), torch.ones(n),
                      importance_sampling_level="sequence")  # fmt: skip
    assert LossParams(kl_estimator=2).kl_estimator == "k2"  # the kernels' old integer ids still read


def test_a_registered_policy_loss_runs_on_every_path():
    @register_policy_loss("test_reinforce")
    def reinforce(ratio, logp, adv, p):  # plain REINFORCE: -A * logp
        return -(adv * logp), torch.zeros_like(logp)

    try:
        logits, targets, adv, mask, old, ref, _ = _batch(7)
        p = LossParams(policy_loss="test_reinforce", agg="token-mean")
        want = -(adv[:, None] * token_logprobs(logits, targets) * mask).sum() / mask.sum()
        lg = logits.float()
        for loss in (
            grpo_loss_reference(logits, targets, adv, mask, params=p).loss,
            ops.grpo_loss(lg, targets, adv.float(), mask.float(), params=p, backend="cpp").loss,
            ops.grpo_loss(lg, targets, adv.float(), mask.float(), params=p, backend="torch").loss,
        ):
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    finally:
        POLICY_LOSSES.pop("test_reinforce")


TRAINER_VARIANTS = {
    "gspo": ["grpo.importance_sampling_level=sequence", "grpo.eps_low=3e-4", "grpo.eps_high=4e-4"],
    "cispo_low_var_kl": ["grpo.policy_loss=cispo", "grpo.kl_estimator=low_var_kl", "grpo.kl_bias_correction=true"],
    "tis_entropy": [
        "grpo.rollout_correction=truncate",
        "grpo.rollout_correction_level=sequence",
        "grpo.entropy_coef=0.01",
    ],  # fmt: skip
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(TRAINER_VARIANTS))
def test_trainer_runs_each_loss_variant_from_the_config(tmp_path, name):
    from pathlib import Path

    from r1engine.trainer.config import load_config
    from r1engine.trainer.grpo import GRPOTrainer
    from r1engine.trainer.metrics import read_metrics

    root = Path(__file__).resolve().parent.parent
    tiny = ["model.preset=tiny", "task.max_digits=2", "task.num_eval=4", "sft.steps=2", "sft.batch_size=8",
            "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.mini_batches=2", "grpo.max_new_tokens=16",
            "grpo.beta=0.01", "training.chunk_len=64", "training.num_threads=1", "eval.every=2", "grpo.steps=2",
            "rollout.backend=native", f"output_dir={tmp_path}"]  # fmt: skip
    cfg = load_config(root / "configs" / "demo.yaml", [*tiny, *TRAINER_VARIANTS[name]])
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert len(records) == 2
    for r in records:
        assert math.isfinite(r["loss/policy"]) and r["loss/entropy"] > 0
        assert ("loss/rollout_is_ratio_mean" in r) == (name == "tis_entropy")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("grpo.policy_loss=sapo", "grpo.policy_loss"),
        ("grpo.kl_estimator=k9", "grpo.kl_estimator"),
        ("grpo.cispo_max_ratio=-1", "grpo.cispo_max_ratio: expected a finite value > 0"),
        ("grpo.rollout_correction_max=0", "grpo.rollout_correction_max"),
        ("grpo.entropy_coef=.nan", "grpo.entropy_coef"),
    ],
)
def test_config_names_a_bad_loss_setting(override, match):
    from r1engine.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_config_refuses_rollout_correction_against_the_samplers_own_logprobs():
    from r1engine.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="grpo.rollout_correction: corrects"):
        load_config(None, ["grpo.rollout_correction=mask", "grpo.old_logprobs=sampler"])
