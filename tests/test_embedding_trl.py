"""r1engine's fused GRPO loss inside TRL's GRPOTrainer (examples/trl_grpo_loss.py) gives TRL's loss and gradients.

One real batch per trainer: TRL generates completions with a tiny random Qwen2, scores them, computes advantages and
the old/reference log-probs (`_generate_and_score_completions`, exactly as in training). The weights are then moved
(as an optimizer step would) so that ratios differ from 1 and clipping is active, and TRL's own `_compute_loss`
(called through the parent class on the same trainer) is compared with the subclass's, loss and every gradient.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from r1engine.data import AdditionTask  # noqa: E402
from r1engine.models import build_char_tokenizer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_loss.py"
G = 4
MAX_COMPLETION = 12


def _load_example():
    spec = importlib.util.spec_from_file_location("trl_grpo_loss", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def digit_fraction_reward(completions: list[str], **_) -> list[float]:
    """A reward a random model already varies on (so advantages are not all zero)."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only wait on each other on a shared CPU
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model_dir = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(config).save_pretrained(model_dir)  # TRL loads the reference model (beta > 0) from the path
    problems = AdditionTask().train_problems(seed=0).take(4)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems]})
    yield tokenizer, model_dir, dataset, tmp_path_factory.mktemp("out")
    torch.set_num_threads(threads)


def _trainer(setup, loss_type: str, beta: float, **config) -> example.R1EngineGRPOTrainer:
    tokenizer, model_dir, dataset, out = setup
    config.setdefault("max_completion_length", MAX_COMPLETION)
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=len(dataset) * G, num_generations=G, loss_type=loss_type,
        beta=beta, epsilon=0.2, epsilon_high=0.28,
        temperature=0.9, num_iterations=2,  # 2 iterations: TRL computes old log-probs, so ratios can leave 1
        use_bias_correction_kl=False, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        seed=0, **config,
    )  # fmt: skip
    return example.R1EngineGRPOTrainer(
        model=Qwen2ForCausalLM.from_pretrained(model_dir),
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def _loss_and_grads(fn, trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _batch_after_a_step(trainer) -> dict:
    """The batch TRL trains on (generated and scored for real), then the weights moved as by an optimizer step."""
    torch.manual_seed(1)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by HF Trainer's loop; TRL divides the loss by it
    examples = [row for row in trainer.train_dataset for _ in range(G)]
    inputs = trainer._generate_and_score_completions(examples)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * (p.std() if p.numel() > 1 and p.std() > 0 else 0.02))
    return inputs


CASES = [
    ("grpo", 0.0, {}),
    # truncated completions masked out: some rows are empty (TRL still counts them in its mean over rows); a random
    # model ends ~1% of its tokens with EOS, so it needs a long horizon to finish some completions
    ("grpo", 0.05, {"mask_truncated_completions": True, "max_completion_length": 64}),
    ("dapo", 0.05, {}),
    ("dr_grpo", 0.0, {}),
    ("bnpo", 0.05, {}),
]


@pytest.mark.parametrize("loss_type,beta,config", CASES, ids=[f"{c[0]}-beta{c[1]}" for c in CASES])
def test_subclass_matches_trl_loss_and_grads(setup, loss_type, beta, config):
    trainer = _trainer(setup, loss_type, beta, **config)
    inputs = _batch_after_a_step(trainer)
    assert inputs["advantages"].abs().sum() > 0, "degenerate batch: all advantages are zero"
    assert inputs["old_per_token_logps"] is not None
    assert (beta == 0) == ("ref_per_token_logps" not in inputs or inputs["ref_per_token_logps"] is None)

    trl_loss, trl_grads = _loss_and_grads(lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), trainer, inputs)
    clip_trl = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    our_loss, our_grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    clip_ours = trainer._metrics["train"]["clip_ratio/region_mean"][-1]

    assert clip_trl > 0, "the batch does not exercise clipping"
    assert clip_ours == pytest.approx(clip_trl, abs=1e-6)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert trl_grads.keys() == our_grads.keys() and len(trl_grads) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_lm_head_matches_trl(setup):
    trainer = _trainer(setup, "grpo", 0.05)
    trainer.fused_lm_head = True  # linear_grpo_loss on the backbone's hidden states and the lm_head weight
    inputs = _batch_after_a_step(trainer)
    trl_loss, trl_grads = _loss_and_grads(lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), trainer, inputs)
    our_loss, our_grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "config,match",
    [
        ({"loss_type": "cispo"}, "loss_type"),
        ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"loss_type": "grpo", "delta": 2.0}, "delta"),
        ({"loss_type": "grpo", "top_entropy_quantile": 0.5}, "top_entropy_quantile"),
    ],
)
def test_unsupported_settings_are_rejected(setup, config, match):
    loss_type = config.pop("loss_type")
    with pytest.raises(ValueError, match=match):
        _trainer(setup, loss_type, 0.0, **config)


def test_bias_corrected_kl_rejected_only_with_beta(setup):
    tokenizer, model_dir, dataset, out = setup
    for beta, ok in ((0.0, True), (0.05, False)):
        args = GRPOConfig(
            output_dir=str(out), per_device_train_batch_size=G, num_generations=G, loss_type="grpo", beta=beta,
            use_bias_correction_kl=True, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        )  # fmt: skip
        build = lambda a=args: example.R1EngineGRPOTrainer(  # noqa: E731
            model=str(model_dir), reward_funcs=digit_fraction_reward, args=a, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip
        if ok:
            build()
        else:
            with pytest.raises(ValueError, match="use_bias_correction_kl"):
                build()
