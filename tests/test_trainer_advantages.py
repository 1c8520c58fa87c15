"""The trainer's advantages go through the estimator registry: `grpo.advantage` is checked against it (errors name the
key), a registered custom estimator is used by the trainer through the config, an estimator that needs a value
model gets the PPO trainer, and a short run with REINFORCE++-baseline trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r1engine.algo.advantages import AdvantageInputs, AdvantageOutput, compute_advantages
from r1engine.algo.advantages import register_advantage_estimator as register
from r1engine.trainer import create_trainer
from r1engine.trainer.config import ConfigError, PPOConfig, load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics
from r1engine.trainer.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.preset=tiny",
    "task.max_digits=2",
    "task.num_eval=4",
    "sft.steps=4",
    "sft.batch_size=8",
    "grpo.prompts_per_step=4",
    "grpo.group_size=4",
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
CALLS: list[AdvantageInputs] = []


@register("test_length_penalised", min_group_size=3)
def length_penalised(x: AdvantageInputs) -> AdvantageOutput:
    """A custom estimator: RLOO's advantage minus a hundredth of the completion's loss tokens; it records what the
    trainer handed it."""
    CALLS.append(x)
    return AdvantageOutput(compute_advantages("rloo", x).advantages - 0.01 * x.lengths)


def _cfg(out_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={out_dir}", *TINY, *extra])


def test_config_checks_grpo_advantage_against_the_registry(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo.advantage: must be one of .*'reinforce_pp_baseline'.*, got 'ppo'"):
        _cfg(tmp_path, "grpo.advantage=ppo")
    for name in ("reinforce_pp_baseline", "gae", "test_length_penalised"):  # built-in and registered ones
        assert _cfg(tmp_path, f"grpo.advantage={name}").grpo.advantage == name
    with pytest.raises(ConfigError, match="grpo.group_size: grpo.advantage='grpo' normalises within a group"):
        _cfg(tmp_path, "grpo.group_size=1", "grpo.mini_batches=1")
    with pytest.raises(ConfigError, match="grpo.group_size: grpo.advantage='test_length_penalised' .* at least 3"):
        _cfg(tmp_path, "grpo.advantage=test_length_penalised", "grpo.group_size=2")
    assert _cfg(tmp_path, "grpo.advantage=gae", "grpo.group_size=1", "grpo.mini_batches=1").grpo.group_size == 1
    # the value-model side is the config's ppo section
    cfg = _cfg(tmp_path, "grpo.advantage=gae", "ppo.lam=1.0", "ppo.value_clip=null")
    assert cfg.ppo == PPOConfig(lam=1.0, value_clip=None)
    with pytest.raises(ConfigError, match=r"ppo.lam: expected a value in \[0, 1\], got 1.5"):
        _cfg(tmp_path, "ppo.lam=1.5")


@pytest.mark.timeout(300)
def test_create_trainer_gives_the_value_model_to_gae(tmp_path):
    with pytest.raises(ConfigError, match="grpo.advantage: 'gae' needs a value model, which GRPOTrainer has not"):
        GRPOTrainer(_cfg(tmp_path / "a", "grpo.advantage=gae"), progress=False)
    trainer = create_trainer(_cfg(tmp_path / "b", "grpo.advantage=gae", "ppo.lam=1.0"), progress=False)
    try:
        assert type(trainer) is PPOTrainer and trainer.ppo.lam == 1.0 and trainer.cfg.grpo.advantage == "gae"
    finally:
        trainer.close()
    trainer = create_trainer(_cfg(tmp_path / "c", "grpo.advantage=reinforce_pp_baseline"), progress=False)
    try:
        assert type(trainer) is GRPOTrainer
    finally:
        trainer.close()


@pytest.mark.timeout(300)
def test_a_registered_estimator_computes_the_trainers_advantages(tmp_path):
    trainer = GRPOTrainer(_cfg(tmp_path, "grpo.advantage=test_length_penalised", "sft.steps=0"), progress=False)
    try:
        trainer._start_training()
        trainer._reset_reference()
        trainer._start_rollout()
        CALLS.clear()
        seqs, fields, metrics = trainer.generate_and_score(0)
        (inputs,) = CALLS
        assert inputs.group_size == 4 and torch.equal(inputs.rewards, fields["rewards"])
        assert inputs.lengths.tolist() == [int(m.sum()) for m in seqs.loss_mask]  # loss tokens per completion
        rloo = compute_advantages("rloo", AdvantageInputs(fields["rewards"], 4)).advantages
        want = rloo - 0.01 * inputs.lengths
        assert torch.equal(fields["adv"], want) and (want != 0).all()
        assert float(metrics["adv/abs_mean"]) == pytest.approx(float(want.abs().mean()))
    finally:
        trainer.close()


@pytest.mark.timeout(600)
def test_short_run_with_reinforce_pp_baseline(tmp_path):
    # a short cold-start SFT on 1-digit sums gives rewards that vary within groups
    sft = ["task.max_digits=1", "sft.steps=30", "sft.batch_size=16", "sft.lr=3.0e-3", "grpo.max_new_tokens=48"]
    cfg = _cfg(tmp_path, "grpo.advantage=reinforce_pp_baseline", "grpo.steps=2", *sft)
    trainer = create_trainer(cfg, progress=False)
    try:
        summary = trainer.run()
        assert summary["steps"] == 2
        records = read_metrics(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2]
        for rec in records[1:]:
            assert math.isfinite(rec["loss/policy"]) and math.isfinite(rec["adv/abs_mean"])
        assert any(rec["adv/abs_mean"] > 0 for rec in records[1:])
        # RL moved the policy away from the reference (the policy after SFT, never reset in 2 steps)
        ref = dict(trainer.ref_model.named_parameters())
        assert not torch.equal(dict(trainer.model.named_parameters())["lm_head.weight"], ref["lm_head.weight"])
        # one more rollout's advantages by hand: the group mean subtracted, then whitened over the batch's loss
        # tokens (Bessel's correction), as verl's reinforce_plus_plus_baseline does
        for step in range(3, 11):  # a rollout whose rewards vary within a group, so the check is not of zeros
            seqs, fields, _ = trainer.generate_and_score(step)
            r = fields["rewards"].double().view(-1, 4)
            x = (r - r.mean(1, keepdim=True)).reshape(-1)
            if (x != 0).any():
                break
        else:
            pytest.fail("no rollout in 8 had rewards that vary within a group")
        w = torch.tensor([int(m.sum()) for m in seqs.loss_mask], dtype=torch.float64)
        mean = (w * x).sum() / w.sum()
        std = ((w * (x - mean) ** 2).sum() / (w.sum() - 1)).sqrt()
        torch.testing.assert_close(fields["adv"], ((x - mean) / (std + 1e-6)).float())
    finally:
        trainer.close()
