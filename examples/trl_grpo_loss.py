"""Embedding r1engine's fused GRPO loss in TRL: a `trl.GRPOTrainer` whose loss is `r1engine.ops.grpo_loss`.

TRL keeps doing everything else (generation, rewards, advantages, old/reference log-probs, optimizer, logging);
only `_compute_loss` changes. TRL's settings map onto the op's arguments one to one:

    TRL GRPOConfig                      r1engine.ops.grpo_loss
    loss_type="grpo"                    agg="seq-mean-token-mean"
    loss_type="bnpo"                    agg="token-mean"                      (tokens of the local batch)
    loss_type="dapo"                    agg="token-mean", rescaled to TRL's global token count
    loss_type="dr_grpo"                 agg="seq-mean-token-sum-norm", max_len=max_completion_length
    epsilon / epsilon_high              eps_low / eps_high
    beta (k3 KL to ref_per_token_logps) beta, kl_estimator="k3", ref_logprobs
      with use_bias_correction_kl=False   (TRL's default True multiplies the KL by the ratio: not expressible)
    temperature                         temperature (log-probs of logits / T, as TRL's fused head)
    old_per_token_logps (None: ratio 1) old_logprobs (None: ratio 1)

With `fused_lm_head=True` the loss is `r1engine.ops.linear_grpo_loss` on the backbone's hidden states and the lm_head
weight (the [B, T, V] logits are never materialised: Triton on GPU, a chunked PyTorch path on CPU); otherwise the
model computes the completion logits and `grpo_loss` runs its fused kernel on them (C++ on CPU, CUDA/Triton on GPU).
TRL features the op does not express (other loss types, sequence-level importance sampling, delta clipping,
entropy masks or bonus, off-policy masks, vLLM importance-sampling correction, MoE aux loss, multimodal inputs)
are rejected at construction, naming the setting. The entropy metric TRL logs is not computed.

Run it (a few steps of a tiny Qwen2 model on the addition task, CPU, under a minute):

    .venv/bin/python examples/trl_grpo_loss.py --steps 3 [--init-from DIR] [--loss-type dapo] [--fused-lm-head]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from r1engine.ops import grpo_loss, linear_grpo_loss

__all__ = ["LOSS_TYPE_TO_AGG", "R1EngineGRPOTrainer"]

LOSS_TYPE_TO_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


class R1EngineGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with `_compute_loss` replaced by r1engine's fused GRPO loss.

    Extra keyword arguments: `fused_lm_head` (use `linear_grpo_loss` on hidden states instead of `grpo_loss` on
    logits) and `loss_backend` (passed to the op: "auto", "torch" (the reference), "cpp", "cuda", "triton").
    """

    def __init__(self, *args: Any, fused_lm_head: bool = False, loss_backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused_lm_head = fused_lm_head
        self.loss_backend = loss_backend
        self._check_supported()

    def _check_supported(self) -> None:
        a = self.args
        if self.loss_type not in LOSS_TYPE_TO_AGG:
            raise ValueError(f"loss_type: expected one of {sorted(LOSS_TYPE_TO_AGG)}, got {self.loss_type!r}")
        unsupported = {
            "importance_sampling_level": (self.importance_sampling_level, self.importance_sampling_level != "token"),
            "delta": (a.delta, a.delta is not None),
            # TRL's default multiplies the KL term by the (differentiable) ratio; r1engine's k3 is the paper's.
            "use_bias_correction_kl": (a.use_bias_correction_kl, a.use_bias_correction_kl and self.beta != 0.0),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, self.off_policy_mask_threshold is not None),
            "top_entropy_quantile": (self.top_entropy_quantile, self.top_entropy_quantile < 1.0),
            "entropy_coef": (a.entropy_coef, self._entropy_bonus_enabled),
            "router_aux_loss_coef": (a.router_aux_loss_coef, self.aux_loss_enabled),
            "vllm_importance_sampling_correction": (
                a.vllm_importance_sampling_correction,
                self.use_vllm and self.vllm_importance_sampling_correction,
            ),
        }
        for name, (value, bad) in unsupported.items():
            if bad:
                raise ValueError(f"{name}={value!r} is not supported by R1EngineGRPOTrainer (r1engine.ops.grpo_loss)")
        if self.fused_lm_head:
            text_config = self.model.config.get_text_config()
            for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
                if getattr(text_config, name, None) not in (None, 1.0):
                    raise ValueError(f"fused_lm_head=True: the model's {name} is not supported (plain lm_head only)")

    def _completion_hidden_or_logits(self, model, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """Hidden states (fused_lm_head) or logits at the positions that predict the completion tokens, plus one
        trailing position (masked in the loss): [B, C + 1, H or V], contiguous, so the op flattens without a copy."""
        if self.fused_lm_head:
            backbone = model.get_decoder()
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return hidden[:, -(logits_to_keep + 1) :].contiguous()
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep + 1
        )
        return out.logits

    def _compute_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        if any(key in inputs for key in ("pixel_values", "token_type_ids", "mm_token_type_ids")):
            raise ValueError("inputs: multimodal batches are not supported by R1EngineGRPOTrainer")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        b, c = completion_ids.shape

        with self.accelerator.autocast():
            features = self._completion_hidden_or_logits(model, input_ids, attention_mask, c)
        # One extra masked column: position t of `features` predicts completion token t; the last predicts nothing.
        pad_col = lambda x, v=0: torch.cat([x, x.new_full((b, 1), v)], dim=1)  # noqa: E731
        targets, loss_mask = pad_col(completion_ids), pad_col(mask)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        options = dict(
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            beta=self.beta if ref is not None else 0.0,
            kl_estimator="k3",
            temperature=self.temperature,
            agg=LOSS_TYPE_TO_AGG[self.loss_type],
            max_len=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            backend=self.loss_backend,
        )
        tensors = (
            targets,
            inputs["advantages"],
            loss_mask,
            None if old is None else pad_col(old),
            None if ref is None else pad_col(ref),
        )
        if self.fused_lm_head:
            weight = model.get_output_embeddings().weight
            loss, metrics = linear_grpo_loss(features.to(weight.dtype), weight, *tensors, **options)
        else:
            loss, metrics = grpo_loss(features, *tensors, **options)

        # TRL's normalisations around the aggregate (so losses and gradients match TRL's exactly).
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":  # TRL averages over all B rows, r1engine over the non-empty ones
            loss = loss * (mask.sum(-1) > 0).sum().clamp(min=1) / b / accumulation
        elif self.loss_type in ("bnpo", "dr_grpo"):
            loss = loss / accumulation
        else:  # dapo: TRL divides by the token count of the whole generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = loss * mask.sum().clamp(min=1) / normalizer

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self.accelerator.gather(metrics.kl_mean).mean().item())
        self._metrics[mode]["clip_ratio/region_mean"].append(self.accelerator.gather(metrics.clip_frac).mean().item())
        return loss


def _demo(
    steps: int, loss_type: str, beta: float, fused_lm_head: bool, output_dir: str, init_from: str | None
) -> list[float]:
    """Train a tiny Qwen2 (random, or loaded from `init_from`) on the addition task; returns the logged losses."""
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1engine.data import AdditionTask
    from r1engine.models import build_char_tokenizer
    from r1engine.rewards import get_reward

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    # TRL builds the reference model (beta > 0) by loading the policy's path again, so start from a directory.
    init_dir = init_from or f"{output_dir}/init"
    if init_from is None:
        Qwen2ForCausalLM(config).save_pretrained(init_dir)
    model = Qwen2ForCausalLM.from_pretrained(init_dir)
    stream = AdditionTask().train_problems(seed=0)
    problems = stream.take(16)
    # r1engine starts every prompt with BOS (the char tokenizer maps the text "<bos>" to its id)
    dataset = Dataset.from_dict(
        {"prompt": ["<bos>" + p.prompt for p in problems], "answer": [p.answer for p in problems]}
    )
    accuracy, fmt = get_reward("arithmetic"), get_reward("format")

    def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [r.score for r in accuracy(completions, answer)]

    def format_reward(completions: list[str], **_: Any) -> list[float]:
        return [r.score for r in fmt(completions, [None] * len(completions))]

    args = GRPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=72, learning_rate=1e-4, beta=beta, loss_type=loss_type, logging_steps=1,
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0,
        use_bias_correction_kl=False,
    )  # fmt: skip
    trainer = R1EngineGRPOTrainer(
        model=model,
        reward_funcs=[arithmetic_reward, format_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        fused_lm_head=fused_lm_head,
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loss-type", default="grpo", choices=sorted(LOSS_TYPE_TO_AGG))
    parser.add_argument("--beta", type=float, default=0.001)
    parser.add_argument("--fused-lm-head", action="store_true", help="linear_grpo_loss on hidden states")
    parser.add_argument("--output-dir", default="runs/trl_grpo_loss")
    parser.add_argument(
        "--init-from",
        help="a Qwen2ForCausalLM directory (e.g. runs/bench_vs_trl/init-sft200/qwen2 from benchmarks/bench_vs_trl.py, "
        "which earns rewards; a random model earns none, so its loss is 0)",
    )
    a = parser.parse_args()
    torch.set_num_threads(1)
    losses = _demo(a.steps, a.loss_type, a.beta, a.fused_lm_head, a.output_dir, a.init_from)
    print(f"R1EngineGRPOTrainer: {len(losses)} steps, losses {[round(x, 5) for x in losses]}")


if __name__ == "__main__":
    main()
