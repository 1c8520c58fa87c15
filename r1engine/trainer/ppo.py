"""The PPO baseline the DeepSeekMath paper compares GRPO with: a learned value model and GAE(gamma, lambda).

Same loop as `GRPOTrainer` (rollout, rule-based rewards, old/reference log-probs, mini-batch steps, weight sync),
with three differences:

* the baseline is a value model ``V(s_t)`` per completion token (the policy's transformer body, its weights
  copied from the policy at the start, no MTP layers and no vocabulary head, plus a zero-initialised scalar head)
  trained with its own AdamW on the clipped value loss;
* advantages are token-level GAE over the sequence reward (given at the last completion token) and per-token
  rewards, whitened over the rollout batch;
* the KL to the reference policy is a per-token penalty in the reward, ``-beta * (log pi_old - log pi_ref)``
  (InstructGPT and DeepSeekMath's PPO), not a term of the loss: the policy loss is `r1engine.ops.grpo_loss` with
  per-token advantages and ``beta = 0``. `beta` is the config's `grpo.beta`.

The advantages are the registry's ``"gae"`` estimator (`r1engine.algo.advantages`), which `grpo.advantage=gae`
selects; `r1engine.trainer.create_trainer` builds this trainer for any estimator that needs a value model. What
stays here is what an estimator cannot do: owning the value model (its weights, optimizer, checkpoint and value loss
in every mini-batch step) and the KL penalty in the reward. A `grpo.advantage` that needs no value model (older
configs set "drgrpo" to pass the group-size check) is replaced by "gae".

Every other hyper-parameter is read from the shared `Config` (`grpo.*` holds the policy side: lr, clip range,
mini-batches, prompts per step); `grpo.group_size` is the number of completions per prompt (1 is standard PPO).
The PPO-only knobs are the config's `ppo.*` section (`PPOConfig`), or a `PPOConfig` passed in its place.

    trainer = create_trainer(load_config("configs/demo.yaml", ["grpo.advantage=gae", "grpo.group_size=1", ...]))
    trainer = PPOTrainer(load_config("configs/demo.yaml", [...]), PPOConfig(lam=0.95))   # the same, explicitly
    trainer.run()
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from r1engine.algo.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, compute_advantages
from r1engine.algo.gae import clipped_value_loss
from r1engine.algo.kl import kl_k3
from r1engine.models import PolicyModel
from r1engine.packing import PackedBatch
from r1engine.trainer.checkpoint import CheckpointManager
from r1engine.trainer.config import Config, ConfigError, GRPOConfig, PPOConfig
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.grpo import GRPOTrainer, advantage_metrics, clipped_policy_loss
from r1engine.trainer.loss_path import resolve_loss_path
from r1engine.trainer.sequences import (
    SequenceBatch,
    loss_tokens,
    pack,
    packed_forward,
    per_sequence,
)

__all__ = ["PPOConfig", "PPOTrainer", "ValueModel", "ppo_train_step"]


class ValueModel(nn.Module):
    """``V(s_t)`` at every position: a copy of the policy's transformer body and a scalar head.

    The body is a `PolicyModel` without MTP layers whose vocabulary head is an identity (the value model reads the
    final-normed hidden states, never token logits), so it holds exactly the body's parameters. The scalar head
    starts at zero: the first values are 0 and the first advantages are the raw returns.
    """

    def __init__(self, policy: PolicyModel) -> None:
        super().__init__()
        if not isinstance(policy, PolicyModel):
            raise TypeError(f"policy: expected a PolicyModel, got {type(policy).__name__}")
        self.body = PolicyModel(dataclasses.replace(policy.config, num_mtp_layers=0))
        self.body.lm_head = nn.Identity()
        body = {k: v for k, v in policy.state_dict().items() if k.startswith("model.") and ".mtp_layers." not in k}
        self.body.load_state_dict(body)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.to(device=policy.device, dtype=policy.dtype)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Values `[K*L]` (fp32) at every position of a packed batch (all chunks as one packed row)."""
        out = packed_forward(self.body, batch)
        return self.value_head(out.hidden).squeeze(-1).float()


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect value model, 0 predicts the mean, < 0 is worse."""
    var = returns.var(unbiased=False)
    return float(1.0 - (returns - values).var(unbiased=False) / var) if var > 0 else float("nan")


def ppo_train_step(
    model: PolicyModel,
    train_engine: TrainEngine,
    value_model: ValueModel,
    value_engine: TrainEngine,
    seqs: SequenceBatch,
    *,
    old: list[torch.Tensor],
    advantages: list[torch.Tensor],
    returns: list[torch.Tensor],
    old_values: list[torch.Tensor],
    cfg: GRPOConfig,
    value_clip: float | None,
    chunk_len: int,
    loss_backend: str = "auto",
    pad_id: int = 0,
    loss_path: str = "auto",
) -> dict[str, float]:
    """One PPO optimizer step of the policy and one of the value model on a mini-batch of sequences.

    `old`, `advantages`, `returns`, `old_values`: per-sequence, position-aligned tensors (as `SequenceBatch`
    fields; values at the loss positions). The policy loss is the fused clipped surrogate with per-token
    advantages and no KL term (PPO puts the KL in the reward); the value loss is `clipped_value_loss`.
    """
    fields = {"old": old, "adv": advantages, "returns": returns, "old_values": old_values}
    batch, _ = pack(seqs, chunk_len, fields=fields, pad_id=pad_id)
    tokens = loss_tokens(batch)
    per_token = {name: batch.fields[name].reshape(-1)[tokens.index] for name in fields}

    # the policy half is GRPO's loss with per-token advantages and no KL term (PPO has it in the reward)
    total, stats = clipped_policy_loss(
        model, batch, tokens, advantages=per_token["adv"], old=per_token["old"], ref=None, cfg=cfg,
        loss_backend=loss_backend,
        loss_path=resolve_loss_path(loss_path, zero_stage=train_engine.zero_stage, loss_backend=loss_backend),
    )  # fmt: skip
    del stats["loss/kl_mean"]
    train_engine.backward(total)
    stats["loss/grad_norm"] = train_engine.step()

    values = value_model(batch)[tokens.index.to(value_model.value_head.weight.device)].cpu()
    value_loss, value_clip_frac = clipped_value_loss(
        values, per_token["old_values"], per_token["returns"], torch.ones_like(values), clip_range=value_clip
    )
    value_engine.backward(value_loss)
    value_grad_norm = value_engine.step()
    return {
        **stats,
        "value/loss": float(value_loss.detach()),
        "value/clip_frac": float(value_clip_frac),
        "value/grad_norm": value_grad_norm,
    }


class _CheckpointsWithValueModel(CheckpointManager):
    """Adds the value model and its optimizer to every checkpoint's trainer state, so they are saved atomically
    with the policy (single process: PPOTrainer has one rank)."""

    def __init__(self, output_dir: str | Path, keep: int, value_state: Callable[[], dict[str, Any]]) -> None:
        super().__init__(output_dir, keep=keep)
        self._value_state = value_state

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict[str, Any] | None) -> Path:
        return super().save(step, write, {**(trainer_state or {}), "value": self._value_state()})


class PPOTrainer(GRPOTrainer):
    algorithm = "PPO"
    needs_old_logprobs = True  # the KL term of its per-token reward
    """`GRPOTrainer` with a value model and GAE instead of group-relative advantages; see the module docstring."""
    has_value_model = True  # what grpo.advantage=gae needs

    def __init__(self, cfg: Config, ppo: PPOConfig | None = None, *, progress: bool = True, **pieces: Any) -> None:
        """`ppo`: replaces the config's `ppo` section; `pieces`: `GRPOTrainer`'s (model, tokenizer, dataset,
        reward_fns)."""
        if ppo is not None and not isinstance(ppo, PPOConfig):
            raise TypeError(f"ppo: expected a PPOConfig, got {type(ppo).__name__}")
        if cfg.training.deepspeed_zero_stage != 0:  # checked before the base class starts reward workers
            raise ConfigError(
                "training.deepspeed_zero_stage: PPOTrainer trains in one process (stage 0); the value model's "
                f"optimizer is not partitioned or checkpointed across ranks, got stage "
                f"{cfg.training.deepspeed_zero_stage}"
            )
        advantage = cfg.grpo.advantage
        if advantage not in ADVANTAGE_ESTIMATORS or not ADVANTAGE_ESTIMATORS[advantage].needs_values:
            advantage = "gae"
        cfg = dataclasses.replace(
            cfg, grpo=dataclasses.replace(cfg.grpo, advantage=advantage), ppo=ppo if ppo is not None else cfg.ppo
        )
        super().__init__(cfg, progress=progress, **pieces)
        self.ppo = cfg.ppo
        # Built in `_start_training`, from the policy's weights at that point (the SFT start or a checkpoint's).
        self.value_model: ValueModel | None = None
        self.value_engine: TrainEngine | None = None
        self.checkpoints = _CheckpointsWithValueModel(self.out_dir, cfg.checkpoint.keep, self._value_state)

    # ------------------------------------------------------------------------------------------- value model
    def _start_training(self) -> None:
        super()._start_training()
        with self.train_engine.full_weights():
            self.value_model = ValueModel(self.model)
        g = self.cfg.grpo
        self.value_engine = TrainEngine(
            self.value_model, lr=self.ppo.value_lr or g.lr, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm
        )

    def _value_state(self) -> dict[str, Any]:
        return {"model": self.value_model.state_dict(), "optimizer": self.value_engine.optimizer_state()}

    def _load_training_state(self, path: Path, state: dict[str, Any]) -> None:
        super()._load_training_state(path, state)
        if "value" not in state:
            raise ValueError(f"checkpoint {path} has no value model: it was not written by PPOTrainer")
        self.value_model.load_state_dict(state["value"]["model"])
        self.value_engine.load_optimizer_state(state["value"]["optimizer"])

    @torch.no_grad()
    def _token_values(self, seqs: SequenceBatch) -> list[torch.Tensor]:
        """The value model's V(s_t) per sequence, position-aligned (0 off the loss positions)."""
        batch, _ = pack(seqs, self.cfg.training.chunk_len, pad_id=self.codec.pad_id)
        tokens = loss_tokens(batch)
        self.value_model.eval()
        values = self.value_model(batch)[tokens.index.to(self.value_model.value_head.weight.device)].cpu()
        return per_sequence(batch, tokens, values, len(seqs))

    # ------------------------------------------------------------------------------------------- the algorithm
    def generate_and_score(self, step: int) -> tuple[SequenceBatch, dict[str, Any], dict[str, Any]]:
        """The GRPO rollout (completions, rewards, old/reference log-probs), then the value model's values and
        GAE advantages/returns per completion token."""
        seqs, fields, metrics = super().generate_and_score(step)
        t0 = time.perf_counter()
        ppo_fields, ppo_metrics = self.gae_fields(seqs, fields["rewards"], fields["old"], fields["ref"])
        ppo_metrics["time/value_inference_s"] = time.perf_counter() - t0
        ppo_metrics["time/inference_s"] = metrics["time/inference_s"] + ppo_metrics["time/value_inference_s"]
        metrics.update(ppo_metrics)
        return seqs, ppo_fields, metrics

    def gae_fields(
        self,
        seqs: SequenceBatch,
        rewards: torch.Tensor,
        old: list[torch.Tensor],
        ref: list[torch.Tensor] | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The training fields of a rollout: the value model's values, GAE advantages (whitened) and returns from
        the sequence `rewards [N]` and the per-token KL penalty (from `old`/`ref` log-probs, position-aligned),
        all as per-sequence position-aligned tensors; and their metrics."""
        values_seq = self._token_values(seqs)
        masks = [m > 0 for m in seqs.loss_mask]
        lengths = torch.tensor([int(m.sum()) for m in masks])

        def completion_aligned(per_seq: list[torch.Tensor]) -> torch.Tensor:
            return pad_sequence([x[m] for x, m in zip(per_seq, masks, strict=True)], batch_first=True)

        def position_aligned(padded: torch.Tensor) -> list[torch.Tensor]:
            out = []
            for row, mask, n in zip(padded, masks, lengths.tolist(), strict=True):
                full = torch.zeros(len(mask), dtype=torch.float32)
                full[mask] = row[:n]
                out.append(full)
            return out

        values = completion_aligned(values_seq)
        valid = torch.arange(values.shape[1])[None, :] < lengths[:, None]
        g, beta = self.cfg.grpo, self.cfg.grpo.beta
        token_rewards, kl_k3_mean = None, 0.0
        if ref is not None and beta > 0:
            old_c, ref_c = completion_aligned(old), completion_aligned(ref)
            token_rewards = -beta * (old_c - ref_c)  # k1 estimate of KL(pi_old || pi_ref) at the sampled token
            kl_k3_mean = float(kl_k3(old_c[valid], ref_c[valid]).mean())
        inputs = AdvantageInputs(
            rewards, g.group_size, lengths=lengths, values=values, token_rewards=token_rewards, gamma=self.ppo.gamma,
            lam=self.ppo.lam, whiten=self.ppo.whiten_advantages,
        )  # fmt: skip
        adv, returns, pre_whitening = compute_advantages(g.advantage, inputs)
        raw_adv = (adv if pre_whitening is None else pre_whitening)[valid]
        fields = {
            "old": old,
            "rewards": rewards,
            "adv": position_aligned(adv),
            "returns": position_aligned(returns),
            "old_values": values_seq,
        }
        metrics = {
            **advantage_metrics(raw_adv),
            "value/mean": values[valid].mean(),
            "value/returns_mean": returns[valid].mean(),
            "value/explained_variance": _explained_variance(values[valid], returns[valid]),
            "loss/kl_mean": kl_k3_mean,  # rollout-time k3 KL to the reference (GRPO logs it from its loss)
        }
        return fields, metrics

    def train_on_rollout(self, seqs: SequenceBatch, fields: dict[str, Any], step: int) -> dict[str, Any]:
        self.value_model.train()
        return super().train_on_rollout(seqs, fields, step)

    def _train_mini_batch(self, seqs: SequenceBatch, fields: dict[str, Any], index: list[int]) -> dict[str, float]:
        return ppo_train_step(
            self.model,
            self.train_engine,
            self.value_model,
            self.value_engine,
            seqs,
            old=[fields["old"][i] for i in index],
            advantages=[fields["adv"][i] for i in index],
            returns=[fields["returns"][i] for i in index],
            old_values=[fields["old_values"][i] for i in index],
            cfg=self.cfg.grpo,
            value_clip=self.ppo.value_clip,
            chunk_len=self.cfg.training.chunk_len,
            loss_backend=self.cfg.training.loss_backend,
            pad_id=self.codec.pad_id,
            loss_path=self.cfg.training.loss_path,
        )
