"""The PPO baseline on the tiny preset with the native rollout engine: a short run trains both the policy and the
value model and logs the value metrics; on a fixed batch the value loss falls; the value model starts as a copy of
the policy body with a zero head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyConfig, PolicyModel
from r1engine.packing import collate, plan
from r1engine.trainer.config import load_config
from r1engine.trainer.metrics import read_metrics
from r1engine.trainer.ppo import PPOConfig, PPOTrainer, ValueModel

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.preset=tiny",
    "task.max_digits=2",
    "task.num_eval=4",
    "sft.steps=0",
    "grpo.prompts_per_step=8",
    "grpo.group_size=1",  # standard PPO: one completion per prompt, the value model is the baseline
    "grpo.advantage=drgrpo",  # unused by PPO; "grpo" would reject group_size=1
    "grpo.mini_batches=2",
    "grpo.max_new_tokens=24",
    "grpo.lr=1.0e-3",
    "grpo.beta=0.01",
    "training.chunk_len=64",
    "training.num_threads=1",
    "rollout.backend=native",
    "eval.every=1",
    "eval.samples=1",
    "checkpoint.every=0",
]


VALUE_KEYS = {
    "value/loss",
    "value/clip_frac",
    "value/grad_norm",
    "value/mean",
    "value/returns_mean",
    "value/explained_variance",
    "time/value_inference_s",
    "adv/abs_mean",
    "loss/policy",
}


def _trainer(out_dir: Path, ppo: PPOConfig, *extra: str) -> PPOTrainer:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={out_dir}", *TINY, *extra])
    return PPOTrainer(cfg, ppo, progress=False)


def test_value_model_is_the_policy_body_with_a_zero_head():
    policy = PolicyModel(PolicyConfig.tiny())
    policy.reset_parameters(seed=0)
    value = ValueModel(policy)
    names = {name for name, _ in value.named_parameters()}
    assert not any("mtp_layers" in n or "lm_head" in n for n in names)  # no drafter, no vocabulary head
    for name, p in policy.named_parameters():
        if name.startswith("model.") and "mtp_layers" not in name:
            assert torch.equal(dict(value.body.named_parameters())[name], p)
    ids = torch.randint(3, policy.config.vocab_size, (9,))
    batch = collate(plan(torch.tensor([9]), 16, 1), 0, [ids], loss_mask=[torch.ones(9)])
    assert torch.all(value(batch) == 0)  # zero head: the first values are 0
    with pytest.raises(TypeError, match="policy"):
        ValueModel(torch.nn.Linear(2, 2))


@pytest.mark.timeout(300)
def test_short_run_trains_policy_and_value_model(tmp_path):
    # A short cold-start SFT on 1-digit sums gets the policy to a mix of rewards 0, 1 and 2.
    sft = ["task.max_digits=1", "sft.steps=30", "sft.batch_size=16", "sft.lr=3.0e-3", "grpo.max_new_tokens=48"]
    trainer = _trainer(tmp_path, PPOConfig(lam=0.95), "grpo.steps=2", "grpo.prompts_per_step=16", *sft)
    try:
        summary = trainer.run()
        assert summary["steps"] == 2
        records = read_metrics(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2]
        for r in records[1:]:
            assert VALUE_KEYS <= r.keys()
            assert math.isfinite(r["value/loss"]) and r["value/loss"] > 0
        assert any(r["reward/mean"] > 0 for r in records[1:])
        # The reference is the policy after SFT (never reset in 2 steps), and the value body started as its copy:
        # RL moved the policy's main model, the value body, and the value head away from zero.
        ref = dict(trainer.ref_model.named_parameters())
        policy = dict(trainer.model.named_parameters())
        assert not torch.equal(policy["lm_head.weight"], ref["lm_head.weight"])
        body = dict(trainer.value_model.body.named_parameters())
        assert any(not torch.equal(body[k], ref[k]) for k in body)
        assert trainer.value_model.value_head.weight.abs().sum() > 0
        # the final checkpoint carries the value model
        _, state = trainer.checkpoints.load()
        assert set(state["value"]) == {"model", "optimizer"}
    finally:
        trainer.close()


@pytest.mark.timeout(300)
def test_value_loss_falls_on_a_fixed_batch(tmp_path):
    """Repeated steps on one rollout whose sequence rewards are fixed: the value model fits the GAE returns."""
    trainer = _trainer(tmp_path, PPOConfig(lam=1.0, value_clip=None, value_lr=3e-3), "grpo.steps=1")
    try:
        trainer._start_training()
        trainer._reset_reference()
        trainer._start_rollout()
        seqs, fields, _ = trainer.generate_and_score(0)
        rewards = 2.0 * (torch.rand(len(seqs), generator=torch.Generator().manual_seed(0)) > 0.5).float()
        fixed, metrics = trainer.gae_fields(seqs, rewards, fields["old"], None)
        assert metrics["value/mean"] == 0  # zero head
        everyone = list(range(len(seqs)))
        trainer.model.train()
        losses = [trainer._train_mini_batch(seqs, fixed, everyone)["value/loss"] for _ in range(8)]
        assert all(math.isfinite(v) for v in losses)
        assert losses[0] == pytest.approx(0.5 * float((rewards**2).mean()), rel=0.05)  # V = 0, lambda = 1: R = r
        assert losses[-1] < 0.6 * losses[0], losses
    finally:
        trainer.close()


def test_bad_ppo_config_names_the_field():
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="value_clip"):
        PPOConfig(value_clip=0.0)
    with pytest.raises(ValueError, match="training.deepspeed_zero_stage"):
        _trainer(Path("unused"), PPOConfig(), "training.deepspeed_zero_stage=1")
    with pytest.raises(TypeError, match="ppo"):
        _trainer(Path("unused"), {"lam": 0.95})
