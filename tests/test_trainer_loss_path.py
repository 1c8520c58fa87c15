"""`training.loss_path`: the trainer's step gives the same loss, metrics and gradients through the materialised logits
and through the lm_head-fused op; "auto" resolves as documented; impossible choices are config errors naming the
key."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
import torch

import r1engine.trainer.loss_path as loss_path_module
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.trainer.config import ConfigError, GRPOConfig, TrainingConfig, load_config
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.grpo import grpo_train_step
from r1engine.trainer.loss_path import LOSS_PATHS, resolve_loss_path
from r1engine.trainer.sequences import build_sequences, loss_tokens, pack, packed_logprobs, per_sequence

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 61


class RecordingEngine(TrainEngine):
    """Keeps the gradients of each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, lr=1e-6)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self) -> float:
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return super().step()


def _rollout():
    gen = torch.Generator().manual_seed(11)
    size = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    prompts = [torch.randint(3, VOCAB, (size(2, 7),), generator=gen).tolist() for _ in range(8)]
    completions = [torch.randint(3, VOCAB, (size(1, 14),), generator=gen).tolist() for _ in range(8)]
    return build_sequences(prompts, completions)


def _model(tied: bool) -> PolicyModel:
    model = PolicyModel(PolicyConfig.tiny(vocab_size=VOCAB, num_layers=1, tie_word_embeddings=tied))
    model.reset_parameters(seed=3)
    return model


def _logprobs(model: PolicyModel, seqs, noise: float) -> list[torch.Tensor]:
    """The model's log-probs of the completion tokens plus noise (0 elsewhere)."""
    batch, _ = pack(seqs, 32)
    tokens = loss_tokens(batch)
    with torch.no_grad():
        lp = per_sequence(batch, tokens, packed_logprobs(model, batch, tokens, 1.0), len(seqs))
    gen = torch.Generator().manual_seed(5)
    return [x + noise * torch.randn(x.shape, generator=gen) * (x != 0) for x in lp]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_every_loss_path_gives_the_same_step(tied, entropy_coef):
    """Two micro-batches (gradients accumulate), old and reference log-probs (clipping and the KL term), the MTP
    loss, and the entropy as a metric or as a bonus with a gradient: the same loss, metrics and gradients."""
    model, seqs = _model(tied), _rollout()
    old, ref = _logprobs(model, seqs, 0.3), _logprobs(model, seqs, 0.1)  # some ratios leave the clip range
    advantages = torch.tensor([0.9, -0.4, 1.3, -1.1, 0.2, -0.7, 0.5, -0.6])
    cfg = GRPOConfig(beta=0.04, max_new_tokens=16, entropy_coef=entropy_coef, mtp_loss_coef=0.1)
    runs = {}
    for path in LOSS_PATHS:
        twin = copy.deepcopy(model)
        engine = RecordingEngine(twin)
        stats = grpo_train_step(twin, engine, seqs, old=old, ref=ref, advantages=advantages, cfg=cfg, chunk_len=32,
                                micro_batch_tokens=32, loss_path=path)  # fmt: skip
        runs[path] = (stats, engine.grads[0])
    want_stats, want_grads = runs["logits"]
    assert want_stats["train/micro_batches"] > 1
    assert want_stats["loss/clip_frac"] > 0 and want_stats["loss/kl_mean"] > 0
    for path, (stats, grads) in runs.items():
        assert stats.keys() == want_stats.keys(), path
        for key, value in want_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (path, key)
        assert grads.keys() == want_grads.keys(), path
        for name, g in want_grads.items():
            # fp32 sums in another order: an entry near zero may differ by the rounding of the tensor's large ones
            atol = 1e-6 * max(float(g.abs().max()), 1e-3)
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=atol, msg=f"{path}: {name}")
    assert want_grads["lm_head.weight" if not tied else "model.embed_tokens.weight"].abs().max() > 0


def test_each_path_runs_its_op(monkeypatch):
    calls = []
    for name in ("grpo_loss", "linear_grpo_loss"):
        real = getattr(loss_path_module, name)
        monkeypatch.setattr(loss_path_module, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model, seqs = _model(False), _rollout()
    cfg = GRPOConfig(beta=0.0, max_new_tokens=16)

    def ops_called(path: str) -> list[str]:
        calls.clear()
        grpo_train_step(model, TrainEngine(model, lr=1e-6), seqs, old=None, ref=None, advantages=torch.randn(8),
                        cfg=cfg, chunk_len=32, loss_path=path)  # fmt: skip
        return list(calls)

    assert ops_called("logits") == ["grpo_loss"]
    assert ops_called("lm_head_fused") == ["linear_grpo_loss"]
    assert ops_called("auto") == ["grpo_loss"]


def test_resolve_loss_path():
    assert resolve_loss_path("auto") == "logits"  # what benchmarks/results/loss_path.md chose
    assert resolve_loss_path("auto", zero_stage=3, loss_backend="cpp") == "logits"
    assert resolve_loss_path("logits", zero_stage=3) == "logits"
    assert resolve_loss_path("lm_head_fused", zero_stage=2, loss_backend="torch") == "lm_head_fused"
    with pytest.raises(ValueError, match="loss_path: expected one of 'auto', 'logits', 'lm_head_fused', got 'x'"):
        resolve_loss_path("x")
    with pytest.raises(ValueError, match="ZeRO-3"):
        resolve_loss_path("lm_head_fused", zero_stage=3)
    with pytest.raises(ValueError, match="the loss backend is 'cpp'"):
        resolve_loss_path("lm_head_fused", loss_backend="cpp")


def test_config_key_matches_the_paths():
    assert typing.get_args(typing.get_type_hints(TrainingConfig)["loss_path"]) == LOSS_PATHS
    assert TrainingConfig().loss_path == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["training.loss_path=nope"],
            "training.loss_path: must be one of 'auto', 'logits', 'lm_head_fused', got 'nope'",
        ),
        (
            ["training.loss_path=lm_head_fused", "training.deepspeed_zero_stage=3"],
            "training.loss_path: 'lm_head_fused'",
        ),
        (["training.loss_path=lm_head_fused", "training.loss_backend=cpp"], "training.loss_path: 'lm_head_fused' runs"),
    ],
)
def test_bad_loss_path_is_a_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")) as info:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert "\n" not in str(info.value)


def test_fused_path_is_accepted_where_it_can_run():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["training.loss_path=lm_head_fused"])
    assert cfg.training.loss_path == "lm_head_fused"
