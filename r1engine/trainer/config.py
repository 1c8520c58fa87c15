"""The typed training configuration: YAML in, dotted command-line overrides, errors that name the key.

Defaults follow the DeepSeek-R1-Zero paper (lr 3e-6, KL coefficient 0.001, G = 16, 32 prompts per step,
reference reset every 400 steps, temperature 1.0); `configs/demo.yaml` overrides them for a tiny model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from r1engine.algo.advantages import ADVANTAGE_ESTIMATORS
from r1engine.algo.policy_loss import LossParams
from r1engine.config_file import ConfigError, apply_override, from_dict, load_dataclass, set_dotted

__all__ = ["Config", "ConfigError", "apply_override", "config_from_dict", "load_config", "set_dotted", "validate"]


@dataclass
class ModelConfig:
    path: str | None = None
    """A Hugging Face model directory (Qwen2/2.5, Llama, Qwen3, MiMo; safetensors or .bin) or a `.gguf` file to start
    from; None: a fresh `model.preset` model with the character tokenizer (the built-in toy tasks)."""
    init_from: str | None = None
    """Alias of `model.path` (older configs)."""
    tokenizer: str | None = None
    """A directory holding the tokenizer when it is not `model.path`'s own."""
    preset: Literal["tiny", "demo"] = "demo"
    """Size preset of r1engine.models.PolicyConfig (ignored with `model.path`)."""
    mtp_layers: int | None = None
    """MTP layers of the policy (the rollout's speculative drafter): a checkpoint with fewer gets new ones attached,
    initialised by `model.mtp_init`; None: 1 for a preset, as many as the checkpoint has for `model.path`."""
    num_mtp_layers: int | None = None
    """Alias of `model.mtp_layers` (older configs)."""
    mtp_init: Literal["last_layer", "random"] = "last_layer"
    """How attached MTP layers start: a copy of the last decoder layer, or random as DeepSeek-V3 (models/mtp.py)."""
    mtp_warmup_steps: int = 0
    """Optimizer steps on the MTP layers alone (body frozen) before RL, on the policy's own samples of training
    prompts, so speculation pays from the first step (0: none)."""
    mtp_warmup_lr: float = 1e-3
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def source(self) -> str | None:
        """The model to start from (`path`, or its alias `init_from`)."""
        return self.path or self.init_from

    @property
    def num_mtp(self) -> int | None:
        """`mtp_layers` (or its alias); None: the default of the source."""
        return self.mtp_layers if self.mtp_layers is not None else self.num_mtp_layers


@dataclass
class TaskConfig:
    """A built-in generator task (used when `data.train_files` is empty)."""

    name: Literal["addition", "countdown"] = "addition"
    min_digits: int = 1
    max_digits: int = 3
    """Addition: digits per operand."""
    min_numbers: int = 3
    max_numbers: int = 4
    """Countdown: numbers per problem."""
    num_eval: int = 200
    """Held-out problems (never used for training)."""


@dataclass
class DataConfig:
    """A data set from files (see r1engine/data/dataset.py); the prompt template applies to built-in tasks too."""

    train_files: list[str] = field(default_factory=list)
    """JSONL, JSON, parquet or CSV files (gzipped too) or `save_to_disk` directories; set: the task is this data."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out rows; empty: `data.eval_size` rows of the training files, the same split in every run."""
    prompt_key: str = "prompt"
    """The prompt column (text, or chat messages as verl and TRL store them); dotted for nested fields."""
    answer_key: str | list[str] | None = None
    """The reference column(s) for the rewards; None: the first of reward_model.ground_truth, solution, answer,
    ground_truth. Several columns reach the rewards as one dict (HumanEval's [test, entry_point, prompt])."""
    source_key: str | None = None
    """The column that picks each row's rewards (`rewards.routes`); None: `data_source` when the rows have it."""
    eval_size: int = 200
    shuffle: bool = True
    """Reshuffle the training rows every epoch (reproducibly from the run's seed)."""
    max_prompt_tokens: int | None = None
    """Templated prompts longer than this are dropped (counted in the log) or refused (`overlong_prompts`); never
    more than training.chunk_len - 1 (None: that), which must hold a prompt and at least one generated token."""
    overlong_prompts: Literal["drop", "error"] = "drop"
    template: str = "plain"
    """plain, chat, r1_zero (DeepSeek-R1-Zero's template as text), r1_zero_chat (its instruction as the chat system
    message), or a string with a {prompt} field (r1engine/data/templates.py)."""
    system_prompt: str | None = None
    """A system message for the chat templates."""


@dataclass
class SFTConfig:
    """Cold-start supervised fine-tuning on worked reasoning traces before RL (0 steps: skip)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class GRPOConfig:
    steps: int = 1000
    prompts_per_step: int = 32
    group_size: int = 16
    lr: float = 3e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.001
    """KL coefficient; 0 disables the reference model."""
    kl_estimator: str = "k3"
    """Schulman's k1/k2/k3, verl's low_var_kl (k3 clamped), or one registered with register_kl_estimator."""
    kl_bias_correction: bool = False
    """Multiply the KL estimate by the importance ratio (TRL's use_bias_correction_kl, from DeepSeek-V3.2)."""
    policy_loss: str = "ppo_clip"
    """"ppo_clip": the clipped surrogate of GRPO (DAPO's clip-higher with eps_high > eps_low); "cispo": the clipped,
    detached importance weight times the log-probability (MiniMax-M1), capped at grpo.cispo_max_ratio; or one
    registered with r1engine.algo.register_policy_loss (checked against the registry, like kl_estimator)."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    cispo_max_ratio: float = 5.0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """"sequence": one importance ratio per sequence, the exp of its mean log-ratio (GSPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef times each token's entropy (from the same vocabulary pass)."""
    rollout_correction: Literal["truncate", "mask"] | None = None
    """Correct for the rollout engine's log-probs differing from the trainer's (pi_old / pi_sampler, per token or per
    sequence): "truncate" clamps that ratio into [rollout_correction_min, rollout_correction_max] (TIS), "mask" drops
    the tokens or sequences whose ratio leaves it (MIS). Needs the engine's log-probs (every engine returns them)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    rollout_correction_min: float = 0.0
    rollout_correction_max: float = 2.0
    advantage: str = "grpo"
    """The advantage estimator, by its name in r1engine.algo.ADVANTAGE_ESTIMATORS (register_advantage_estimator adds
    one): "grpo" (group mean and std), "drgrpo" (group mean only), "rloo" (leave-one-out mean),
    "reinforce_pp_baseline" (REINFORCE++: group mean, then whitened over the whole batch), or "gae" (PPO: a value
    model and GAE, with the `ppo.*` settings; r1engine.trainer.create_trainer then builds the PPO trainer)."""
    agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    mini_batches: int = 16
    """Optimizer steps per rollout batch (the paper splits each rollout into 16 mini-batches)."""
    inner_epochs: int = 1
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    """Where the importance ratio's old log-probs come from: an inference pass of the trainer's model over the
    rollout ("recompute"), or the rollout engine's own log-probs of the sampled tokens ("sampler": the exact
    behaviour policy, one forward pass fewer per step; needs rollout.top_p 1 and rollout.top_k -1: the trainer's
    policy is the unfiltered softmax(logits / grpo.temperature))."""
    ref_reset_every: int = 400
    """Every this many steps the reference policy becomes the current policy (0: never)."""
    temperature: float = 1.0
    max_new_tokens: int = 32768
    mtp_loss_coef: float = 0.1
    """Weight of the MTP head's next-next-token loss, which keeps the rollout drafter fresh."""
    skip_zero_advantage: bool = True
    """Leave sequences with advantage 0 (groups whose completions all scored alike) out of the training forward and
    backward when nothing else needs them (no KL term, no MTP loss): the loss and gradient are unchanged (the kept
    sequences' loss is rescaled to the whole batch's normaliser); loss metrics then cover the trained sequences."""

    def loss_params(self, *, with_kl: bool = True) -> LossParams:
        """The loss settings as the one object every loss layer takes (``with_kl=False``: beta 0, no reference)."""
        return LossParams(
            policy_loss=self.policy_loss, eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip,
            cispo_max_ratio=self.cispo_max_ratio, importance_sampling_level=self.importance_sampling_level,
            beta=self.beta if with_kl else 0.0, kl_estimator=self.kl_estimator,
            kl_bias_correction=self.kl_bias_correction, entropy_coef=self.entropy_coef, track_entropy=True,
            temperature=self.temperature, agg=self.agg, max_len=self.max_new_tokens,
            rollout_correction=self.rollout_correction, rollout_correction_level=self.rollout_correction_level,
            rollout_correction_min=self.rollout_correction_min, rollout_correction_max=self.rollout_correction_max,
        )  # fmt: skip


@dataclass
class RewardsConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"arithmetic": 1.0, "format": 1.0})
    """The default route: named reward functions (see `r1engine.rewards.available_rewards()`, or "pkg.module:fn")
    and their weights: the task's accuracy reward and format with equal weight, as in the paper. May be empty when
    `rewards.routes` covers every source of the data."""
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    """Rewards per data source (the rows' `data.source_key`), e.g. {gsm8k: {math_accuracy: 1, format: 1},
    humaneval: {code: 1}}; other sources take `rewards.weights`."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword options per reward, e.g. {format: {partial: true}, code: {time_limit_s: 5}}."""
    num_workers: int = 1
    """Reward worker processes (scoring overlaps generation and log-prob inference)."""
    timeout_s: float = 10.0
    """Limit for scoring one row (all its reward functions): past it the row's rewards get 0 with reason
    "timeout" and its worker is replaced; the other rows are unaffected."""
    allow_weak_sandbox: bool = False
    """Let rewards that run model-generated programs (`code`) use the weaker rlimit + audit-hook sandbox when
    bubblewrap is unavailable. Off: such a reward refuses to start and says why (see r1engine.rewards.sandbox)."""
    model_rewards_from_step: int = 0
    """The GRPO step from which the reward models (`rm:<name>` in the routes) count: before it they are not computed
    and their rows get the rule rewards of their route alone (R1 adds the general rewards only late in its second
    stage: longer exposure to model rewards led to reward hacking)."""
    overlap: bool = True
    """Score the rollout (rule rewards in the workers, reward models on their threads) while the old/reference
    log-probs are inferred, waiting for the rewards after that inference. Off: wait for them before it (the same
    rewards and step; only the timing differs: benchmarks/bench_reward_overlap.py measures both). With
    `dapo.dynamic_sampling` the rewards are always awaited first."""


@dataclass
class RewardModelConfig:
    """A reward model that routes name as `rm:<name>` (`reward_models.<name>`; see r1engine.reward_models)."""

    path: str = ""
    """A reward-model directory (`r1engine train-rm`'s output or a Hugging Face *ForSequenceClassification one); for
    kind generative a causal language model's directory (a Hugging Face *ForCausalLM one)."""
    kind: Literal["auto", "helpfulness", "safety", "generative"] = "auto"
    """helpfulness (a pairwise model, compared within each prompt's group), safety (a pointwise classifier, one score
    per response), generative (a causal LM asked "A or B?" as a pairwise helpfulness judge, for users without a
    trained reward model: r1engine.reward_models.generative), or auto: read from the checkpoint's RewardFormat
    (pairwise: helpfulness, pointwise: safety)."""
    pairing: Literal["round_robin", "reference", "best_of_group"] = "round_robin"
    """helpfulness: who is compared with whom (reference: against the row's reference answer)."""
    transform: Literal["prob", "logit"] = "prob"
    """prob: a probability in [0, 1], on the scale of the rule rewards; logit: the raw preference or log-odds."""
    device: str | None = None
    """Where the model scores; None: the training device."""
    offload: bool = False
    """Keep the weights on the CPU between scoring calls (on a GPU device)."""
    token_budget: int = 16384
    """Tokens per packed scoring forward."""
    max_length: int | None = None
    """Inputs longer than this keep their end; None: the model's context length."""
    tokenizer: str | None = None
    """The model's tokenizer when its directory has none."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    backend: Literal["hf", "vllm"] = "hf"
    """generative: how the judge runs: hf (transformers, on `device`) or vllm (its own in-process vLLM engine)."""
    judge_template: str | None = None
    """generative: the comparison the judge reads, a format string with {prompt}, {a} and {b}; None: the default
    (`r1engine.reward_models.generative.DEFAULT_TEMPLATE`)."""


@dataclass
class RolloutConfig:
    backend: Literal["auto", "vllm", "native"] = "auto"
    num_speculative_tokens: int = 1
    """MTP draft tokens per step (0: no speculation)."""
    top_p: float = 1.0
    top_k: int = -1
    vllm_log_level: str = "ERROR"
    """What vLLM itself logs (DEBUG, INFO, WARNING, ERROR, CRITICAL); `r1engine train --vllm-logs` is INFO. The
    environment's VLLM_LOGGING_LEVEL, when set, wins."""
    offload_between_stages: bool = True
    """Release the rollout engine's device memory while the trainer runs (when rollout and training share a
    device; ignored when `rollout.device` is another one)."""
    device: str | None = None
    """Where the native engine generates: None shares the training device; another device (e.g. "cuda:1")
    gives rollouts their own, so nothing is offloaded between stages. vLLM places itself (CUDA_VISIBLE_DEVICES)."""
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    """sync: each step samples with the weights it trains (the paper's loop). one_step_off: step k+1's batch is
    sampled by the weights of step k while step k trains (staleness 1). async: up to `max_staleness` batches are
    sampled ahead; none older than that many policy versions is trained on. The off-policy modes correct with the
    sampler's log-probs (r1engine.trainer.async_rollout)."""
    max_staleness: int = 1
    """async: the most policy versions a trained batch may lag the trained weights (>= 1); also its lookahead."""
    sync_warmup_steps: int = 0
    """Off-policy modes: the run's first this many steps sample with the weights they train (staleness 0, no
    overlap), through the same worker. Off-policy lag costs most at a sparse-reward start, where each step's few
    rewarded samples drive the next; once rewards are dense, the lag costs little and the overlap pays."""
    remote: bool | None = None
    """Run the rollout engine in a worker process of its own (r1engine.rollout.remote), weights pushed over a gloo
    group; None: on for the off-policy modes (which need it), off for sync."""
    num_threads: int = 0
    """The remote worker's intra-op CPU threads (0: PyTorch's default); split the cores with training.num_threads."""
    listen: str | None = None
    """"host:port" on which the trainer waits for a rollout worker started elsewhere (another machine, another
    launcher) with `r1engine rollout-worker --connect host:port`, instead of spawning one (needs a worker process:
    an off-policy mode or rollout.remote=true). R1ENGINE_ROLLOUT_AUTHKEY on both sides, unless host is loopback.
    With several ranks or workers, worker w of rank r listens on port + r * rollout.workers + w."""
    workers: int = 1
    """Rollout worker processes per trainer rank (needs a worker process: an off-policy mode or rollout.remote=true):
    each batch's prompts are split among them and the weights pushed to each (r1engine.rollout.pool)."""
    partial_rollouts: bool = False
    """Off-policy modes: sample each batch in segments of `segment_tokens` new tokens, so that weights pushed while
    it generates are loaded at the next segment boundary; the rest of its tokens sample with them, each token keeping
    its own version and log-prob (r1engine.rollout.partial)."""
    segment_tokens: int = 0
    """Partial rollouts' segment length in new tokens (0: a quarter of grpo.max_new_tokens, at least 1)."""

    def segment_length(self, max_new_tokens: int) -> int | None:
        """The segment length partial rollouts use (None when they are off)."""
        if not self.partial_rollouts:
            return None
        return self.segment_tokens or max(1, max_new_tokens // 4)

    @property
    def filtered(self) -> bool:
        """Whether rollouts sample with top-p / top-k (their log-probs are then the filtered distribution's)."""
        return self.top_p != 1.0 or self.top_k != -1

    @property
    def is_remote(self) -> bool:
        """Whether the engine runs in a worker process (`remote`, or its default for the mode)."""
        return self.remote if self.remote is not None else self.mode != "sync"


@dataclass
class TrainingConfig:
    device: str = "auto"
    """Training device: "auto" is cuda (this rank's local GPU) when available, else cpu; or e.g. "cpu", "cuda:0"."""
    loss_backend: Literal["auto", "torch", "cpp", "triton", "cuda"] = "auto"
    loss_path: Literal["auto", "logits", "lm_head_fused"] = "auto"
    """How the policy loss reads the model's output (r1engine/trainer/loss_path.py): "logits" materialises the loss
    tokens' logits and the loss backward writes its gradient into them; "lm_head_fused" gives the hidden states and
    lm_head.weight to the fused op, which never holds the logits whole: less memory once the logits are large, more
    time on CPU (needs training.loss_backend auto, torch or triton, and not ZeRO-3); "auto" is "logits", the faster
    in benchmarks/results/loss_path.md (CPU; no GPU measurement yet)."""
    chunk_len: int = 1024
    """Packed chunk length in tokens; must hold the longest prompt + completion."""
    micro_batch_tokens: int | None = 8192
    """At most this many packed tokens (whole chunks, at least one) per forward + backward; a mini-batch larger than
    that accumulates the gradients of several passes into its one optimizer step (the same step: the losses are
    weighted by their share of the mini-batch's). Bounds the activation memory; null: the whole mini-batch at once."""
    deepspeed_zero_stage: int = 0
    """0: plain PyTorch (one process); 1-3: DeepSpeed ZeRO stage, for one or several ranks (`r1engine train --nproc N`,
    torchrun or the deepspeed launcher)."""
    offload_optimizer: bool = False
    deterministic: bool = False
    num_threads: int = 0
    """CPU threads for PyTorch's intra-op parallelism (0: PyTorch's default). On a shared, oversubscribed CPU
    a small model trains faster with 1 (parallel regions wait on descheduled threads)."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Save every this many GRPO steps (0: only at the end)."""
    keep: int = 2
    resume: bool = True
    """Continue from the newest intact checkpoint in output_dir (damaged newer ones are renamed step-N.damaged, with a
    warning); a previous run there without one stops the run with an error. False: start over, moving a previous
    run's files (metrics, plot, checkpoints) into output_dir/previous-N/; nothing is deleted or overwritten."""


@dataclass
class EvalConfig:
    """Held-out evaluation as in the R1 paper: pass@1 averaged over `samples` completions per problem sampled at
    `temperature` / `top_p` (the paper: 0.6 / 0.95); greedy accuracy is logged beside it."""

    every: int = 10
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95


@dataclass
class DAPOConfig:
    """DAPO's data-side techniques (r1engine/algo/dapo.py; Yu et al., "DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale"), each off by default."""

    dynamic_sampling: bool = False
    """Drop the prompt groups whose rewards are all equal (every completion gets advantage 0: no policy gradient) and
    sample more prompts, in rounds, until the step has grpo.prompts_per_step groups whose rewards vary or
    `dapo.max_sampling_rounds` rounds ran; short then, the step trains on all the varying groups plus dropped ones in
    sampling order (they add no policy gradient; the batch keeps its size). A round samples the prompts expected to
    supply the missing groups at the rate seen so far, at most grpo.prompts_per_step. The rewards decide before the
    old/reference log-probs are inferred (for the chosen groups only), so scoring no longer overlaps that inference.
    The reward metrics describe the step's first round, the prompts a run without it would train on."""
    max_sampling_rounds: int = 4
    """Rounds of sampling per step with `dapo.dynamic_sampling`, the first one included (verl's max_num_gen_batches);
    bounds the extra generation of a step."""
    mask_truncated_completions: bool = False
    """Overlong filtering: completions cut off by the length limit (no stop token at their end: grpo.max_new_tokens
    or training.chunk_len reached) are left out of the loss; they still count in the rewards, the group advantages
    and the reward metrics."""
    overlong_buffer_len: int = 0
    """Soft overlong punishment (0: off): completions longer than grpo.max_new_tokens minus this many tokens get a
    penalty added to their reward, growing linearly from 0 to `dapo.overlong_penalty_factor` at grpo.max_new_tokens
    (lengths count the stop token). At most grpo.max_new_tokens."""
    overlong_penalty_factor: float = 1.0
    """The soft overlong punishment's largest penalty (subtracted from the reward at grpo.max_new_tokens)."""


@dataclass
class PPOConfig:
    """The value-model side of `grpo.advantage=gae` (r1engine.trainer.ppo.PPOTrainer); the policy side is `grpo.*`."""

    gamma: float = 1.0
    """Discount per token (1: the reward is not discounted over the completion, as in DeepSeekMath's PPO)."""
    lam: float = 0.95
    """GAE lambda: 1 is the Monte-Carlo return (unbiased), smaller trusts the value model more."""
    value_lr: float | None = None
    """AdamW learning rate of the value model (None: `grpo.lr`)."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the rollout-time values (None: plain squared error)."""
    whiten_advantages: bool = True
    """Normalise the GAE advantages to mean 0, std 1 over the rollout batch's completion tokens."""

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ppo.{name}: expected a value in [0, 1], got {value!r}")
        if self.value_lr is not None and not (self.value_lr > 0 and math.isfinite(self.value_lr)):
            raise ConfigError(f"ppo.value_lr: expected a finite value > 0 (or None), got {self.value_lr!r}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ConfigError(f"ppo.value_clip: expected a value > 0 (or None), got {self.value_clip!r}")


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tensorboard: bool = False
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward_models: dict[str, RewardModelConfig] = field(default_factory=dict)
    """Reward models by name, used by the routes as `rm:<name>` (`RewardModelConfig`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_positive(cfg: Config) -> None:
    for key in (
        "grpo.steps", "grpo.prompts_per_step", "grpo.group_size", "grpo.mini_batches", "grpo.inner_epochs",
        "grpo.max_new_tokens", "sft.batch_size", "task.num_eval", "training.chunk_len", "eval.every",
        "rewards.num_workers", "eval.samples",
    ):  # fmt: skip
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    for key in ("sft.steps", "grpo.ref_reset_every", "grpo.beta", "grpo.mtp_loss_coef", "checkpoint.every", "seed",
                "training.num_threads"):  # fmt: skip
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    # finite and > 0 (max_grad_norm may be .inf: no clipping; 0 or less would stop or flip the update)
    for key in ("grpo.lr", "sft.lr", "rewards.timeout_s", "eval.temperature", "grpo.max_grad_norm"):
        value = _get(cfg, key)
        if not (value > 0 and (math.isfinite(value) or key == "grpo.max_grad_norm")):
            raise ConfigError(f"{key}: must be a finite value > 0, got {value}")
    for key in ("rollout.top_p", "eval.top_p"):
        if not 0 < _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {_get(cfg, key)}")
    if not (cfg.rollout.top_k == -1 or cfg.rollout.top_k >= 1):
        raise ConfigError(f"rollout.top_k: must be -1 (off) or >= 1, got {cfg.rollout.top_k}")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if str(cfg.rollout.vllm_log_level).upper() not in levels:
        raise ConfigError(
            f"rollout.vllm_log_level: must be one of {', '.join(levels)}, got {cfg.rollout.vllm_log_level!r}"
        )
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep: must be >= 1 (the checkpoint to resume from), got {cfg.checkpoint.keep}")
    if cfg.training.micro_batch_tokens is not None and cfg.training.micro_batch_tokens <= 0:
        raise ConfigError(f"training.micro_batch_tokens: must be > 0 or null, got {cfg.training.micro_batch_tokens}")


def validate(cfg: Config) -> None:
    """Reject impossible combinations, naming the key."""
    _check_positive(cfg)
    g = cfg.grpo
    if g.temperature <= 0:
        raise ConfigError(f"grpo.temperature: must be > 0, got {g.temperature}")
    if not (0 <= g.eps_low < 1):
        raise ConfigError(f"grpo.eps_low: must be in [0, 1), got {g.eps_low}")
    if g.eps_high < 0:
        raise ConfigError(f"grpo.eps_high: must be >= 0, got {g.eps_high}")
    if g.dual_clip is not None and g.dual_clip <= 1:
        raise ConfigError(f"grpo.dual_clip: must be > 1 (or null to disable), got {g.dual_clip}")
    try:
        g.loss_params()  # every loss setting, checked where the loss defines it
    except ValueError as exc:
        raise ConfigError(f"grpo.{exc}") from None
    if g.rollout_correction is not None and g.old_logprobs == "sampler":
        raise ConfigError(
            "grpo.rollout_correction: corrects the trainer's old log-probs for the sampler's; with grpo.old_logprobs="
            "'sampler' they are the sampler's (the ratio is 1): use grpo.old_logprobs=recompute"
        )
    batch = g.prompts_per_step * g.group_size
    if batch % g.mini_batches:
        raise ConfigError(
            f"grpo.mini_batches: the rollout batch of {batch} completions (grpo.prompts_per_step={g.prompts_per_step}"
            f" x grpo.group_size={g.group_size}) is not divisible into {g.mini_batches} mini-batches"
        )
    if g.advantage not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(
            f"grpo.advantage: must be one of {', '.join(map(repr, sorted(ADVANTAGE_ESTIMATORS)))} (or a name given to "
            f"r1engine.algo.register_advantage_estimator), got {g.advantage!r}"
        )
    need = ADVANTAGE_ESTIMATORS[g.advantage].min_group_size
    if g.group_size < need:
        raise ConfigError(
            f"grpo.group_size: grpo.advantage={g.advantage!r} normalises within a group, it needs at least {need} "
            f"completions, got {g.group_size}"
        )
    if g.beta > 0 and g.ref_reset_every == 0 and cfg.model.source is None and cfg.sft.steps == 0:
        raise ConfigError(
            "grpo.beta: a KL coefficient needs a reference model, but the policy starts from random weights with "
            "no SFT and the reference is never reset (grpo.ref_reset_every=0)"
        )
    if not 0 <= cfg.training.deepspeed_zero_stage <= 3:
        raise ConfigError(f"training.deepspeed_zero_stage: must be 0-3, got {cfg.training.deepspeed_zero_stage}")
    if cfg.training.offload_optimizer and cfg.training.deepspeed_zero_stage == 0:
        raise ConfigError("training.offload_optimizer: needs training.deepspeed_zero_stage >= 1")
    _validate_loss_path(cfg)
    if cfg.task.min_digits < 1 or cfg.task.max_digits < cfg.task.min_digits:
        raise ConfigError(
            f"task.max_digits: need 1 <= task.min_digits <= task.max_digits, got {cfg.task.min_digits}, "
            f"{cfg.task.max_digits}"
        )
    if cfg.task.min_numbers < 2 or cfg.task.max_numbers < cfg.task.min_numbers:
        raise ConfigError(
            f"task.max_numbers: need 2 <= task.min_numbers <= task.max_numbers, got {cfg.task.min_numbers}, "
            f"{cfg.task.max_numbers}"
        )
    for key in ("training.device", "rollout.device"):
        value = _get(cfg, key)
        if value is not None and value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"{key}: not a device name: {value!r}") from exc
    if cfg.rollout.device is not None and cfg.rollout.backend == "vllm":
        raise ConfigError("rollout.device: applies to the native engine; vLLM places itself (CUDA_VISIBLE_DEVICES)")
    _validate_rewards(cfg)
    _validate_data(cfg)
    if cfg.rollout.num_speculative_tokens < 0:
        raise ConfigError(f"rollout.num_speculative_tokens: must be >= 0, got {cfg.rollout.num_speculative_tokens}")
    _validate_model(cfg)
    _validate_dapo(cfg)
    _validate_rollout_mode(cfg)


def _validate_loss_path(cfg: Config) -> None:
    from r1engine.trainer.loss_path import resolve_loss_path

    t = cfg.training
    try:
        resolve_loss_path(t.loss_path, zero_stage=t.deepspeed_zero_stage, loss_backend=t.loss_backend)
    except ValueError as exc:
        raise ConfigError(f"training.{exc}") from None


def _validate_dapo(cfg: Config) -> None:
    d, g = cfg.dapo, cfg.grpo
    if d.max_sampling_rounds < 1:
        raise ConfigError(f"dapo.max_sampling_rounds: must be >= 1 (the step's own round), got {d.max_sampling_rounds}")
    if d.dynamic_sampling and g.group_size < 2:
        raise ConfigError("dapo.dynamic_sampling: needs grpo.group_size >= 2 (a group of one never varies)")
    if not 0 <= d.overlong_buffer_len <= g.max_new_tokens:
        raise ConfigError(
            f"dapo.overlong_buffer_len: must be in [0, grpo.max_new_tokens={g.max_new_tokens}], got "
            f"{d.overlong_buffer_len}"
        )
    if not (math.isfinite(d.overlong_penalty_factor) and d.overlong_penalty_factor >= 0):
        raise ConfigError(f"dapo.overlong_penalty_factor: must be a finite value >= 0, got {d.overlong_penalty_factor}")


def _validate_rollout_mode(cfg: Config) -> None:
    """The off-policy modes: a worker process, and old log-probs that are the behaviour policy's."""
    r, g = cfg.rollout, cfg.grpo
    if g.old_logprobs == "sampler" and r.filtered:
        # the engines report the log-probs of the filtered distribution they sampled from, the trainer's policy (the
        # ratio's numerator) is unfiltered: as the ratio's denominator they agree only without top-p / top-k
        for key, value, plain in (("rollout.top_p", r.top_p, 1.0), ("rollout.top_k", r.top_k, -1)):
            if value != plain:
                raise ConfigError(
                    f"{key}: grpo.old_logprobs=sampler needs {plain} (the sampler's log-probs are those of the "
                    f"filtered distribution, the trained policy is softmax(logits / T) unfiltered; grpo.old_logprobs="
                    f"recompute with grpo.rollout_correction weighs the filter in), got {value}"
                )
    if r.mode not in ("sync", "one_step_off", "async"):
        raise ConfigError(f"rollout.mode: must be sync, one_step_off or async, got {r.mode!r}")
    if r.max_staleness < 1:
        raise ConfigError(f"rollout.max_staleness: must be >= 1, got {r.max_staleness}")
    if r.max_staleness != 1 and r.mode != "async":
        raise ConfigError(f"rollout.max_staleness: only for rollout.mode=async (got mode {r.mode})")
    if r.sync_warmup_steps < 0:
        raise ConfigError(f"rollout.sync_warmup_steps: must be >= 0, got {r.sync_warmup_steps}")
    if r.sync_warmup_steps and r.mode == "sync":
        raise ConfigError(f"rollout.sync_warmup_steps: only for rollout.mode one_step_off or async (got mode {r.mode}, "
                          "whose every step is synchronous)")  # fmt: skip
    if r.num_threads < 0:
        raise ConfigError(f"rollout.num_threads: must be >= 0, got {r.num_threads}")
    if r.workers < 1:
        raise ConfigError(f"rollout.workers: must be >= 1, got {r.workers}")
    if r.workers > 1 and not r.is_remote:
        raise ConfigError(f"rollout.workers: {r.workers} worker processes need rollout.remote=true or an off-policy "
                          "rollout.mode")  # fmt: skip
    if r.segment_tokens < 0:
        raise ConfigError(f"rollout.segment_tokens: must be >= 0 (0: a quarter of grpo.max_new_tokens), got "
                          f"{r.segment_tokens}")  # fmt: skip
    if r.listen is not None:
        from r1engine.rollout.external import authkey, parse_address

        if not r.is_remote:
            raise ConfigError("rollout.listen: needs a rollout worker process (rollout.remote=true or an off-policy "
                              "rollout.mode)")  # fmt: skip
        try:
            host, _ = parse_address(r.listen, "rollout.listen")  # its message names the key
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            authkey(host)
        except ValueError as exc:
            raise ConfigError(f"rollout.listen: {exc}") from None
    if r.mode == "sync":
        if r.partial_rollouts:
            raise ConfigError(
                "rollout.partial_rollouts: needs rollout.mode one_step_off or async (in sync mode no weights arrive "
                "while a batch generates)"
            )
        return
    if r.remote is False:
        raise ConfigError(f"rollout.remote: rollout.mode={r.mode} generates in a worker process; set it true (or null)")
    if g.old_logprobs == "recompute" and g.rollout_correction is None:
        raise ConfigError(
            f"grpo.old_logprobs: rollout.mode={r.mode} trains on samples of older weights; use 'sampler' (the "
            "behaviour policy's log-probs as the old ones) or keep 'recompute' with grpo.rollout_correction set"
        )


def _validate_rewards(cfg: Config) -> None:
    """Every route names known rewards; options go to rewards that some route uses."""
    from r1engine.rewards import available_rewards

    r = cfg.rewards
    if not r.weights and not r.routes:
        raise ConfigError("rewards.weights: at least one reward function is needed (or rewards.routes)")
    named = [("rewards.weights", r.weights)] + [(f"rewards.routes.{src}", w) for src, w in r.routes.items()]
    for key, weights in named:
        if key != "rewards.weights" and not weights:
            raise ConfigError(f"{key}: a route needs at least one reward")
        for name in weights:
            if name.startswith("rm:"):  # a reward model, before the custom imports ("pkg.module:attr")
                if name[3:] not in cfg.reward_models:
                    known = ", ".join(sorted(cfg.reward_models)) or "none"
                    raise ConfigError(
                        f"{key}.{name}: no reward model named {name[3:]!r} in reward_models (known: {known})"
                    )
                continue
            if name not in available_rewards() and ":" not in name:  # "pkg.module:attr" names a custom reward
                raise ConfigError(f"{key}.{name}: unknown reward (known: {', '.join(available_rewards())})")
    if r.model_rewards_from_step < 0:
        raise ConfigError(f"rewards.model_rewards_from_step: must be >= 0, got {r.model_rewards_from_step}")
    for name, spec in cfg.reward_models.items():
        if not name or ":" in name:
            raise ConfigError(f"reward_models.{name}: a reward model's name must be non-empty and without ':'")
        if not spec.path:
            raise ConfigError(f"reward_models.{name}.path: the reward model's directory is required")
        if not Path(spec.path).exists():
            raise ConfigError(f"reward_models.{name}.path: {spec.path!r} does not exist")
        if spec.token_budget < 1:
            raise ConfigError(f"reward_models.{name}.token_budget: must be >= 1, got {spec.token_budget}")
        if spec.max_length is not None and spec.max_length < 1:
            raise ConfigError(f"reward_models.{name}.max_length: must be >= 1 (or null), got {spec.max_length}")
        _validate_generative(name, spec)
    used = {name for _, weights in named for name in weights}
    for name in r.options:
        if name not in used:
            raise ConfigError(f"rewards.options.{name}: no route uses this reward (used: {', '.join(sorted(used))})")


def _validate_generative(name: str, spec: RewardModelConfig) -> None:
    """The generative judge's keys, and no judge keys on another kind of reward model."""
    import importlib.util

    key = f"reward_models.{name}"
    if spec.kind != "generative":
        for field_name, value in (("backend", spec.backend != "hf"), ("judge_template", spec.judge_template)):
            if value:
                raise ConfigError(f"{key}.{field_name}: only for kind generative (this model's kind is {spec.kind})")
        return
    if spec.judge_template is not None:
        from r1engine.reward_models.generative import check_template

        try:
            check_template(spec.judge_template)
        except ValueError as exc:
            raise ConfigError(f"{key}.judge_template: {exc}") from None
    if spec.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{key}.backend: vllm is not installed (install vllm, or use backend: hf)")
        for field_name, value in (("device", spec.device), ("offload", spec.offload)):
            if value:
                raise ConfigError(f"{key}.{field_name}: not with backend vllm (vLLM places the judge itself)")


def _validate_data(cfg: Config) -> None:
    """What can be checked without reading the data: the template, the limits, the task choice."""
    from r1engine.data.templates import PromptTemplate, TemplateError

    d = cfg.data
    try:
        PromptTemplate(d.template, d.system_prompt)
    except TemplateError as exc:
        raise ConfigError(str(exc)) from exc
    if d.eval_size < 1 and not d.eval_files and d.train_files:
        raise ConfigError(f"data.eval_size: must be >= 1 without data.eval_files, got {d.eval_size}")
    if d.max_prompt_tokens is not None and d.max_prompt_tokens < 1:
        raise ConfigError(f"data.max_prompt_tokens: must be >= 1 (or null), got {d.max_prompt_tokens}")
    if d.eval_files and not d.train_files:
        raise ConfigError("data.eval_files: given without data.train_files")
    if d.train_files and cfg.sft.steps:
        raise ConfigError(
            "sft.steps: the cold-start SFT trains on a built-in task's worked solutions; with data.train_files set it "
            "to 0 (start from a model that follows the template, e.g. an instruct model)"
        )


def _validate_model(cfg: Config) -> None:
    """The model section, checked without loading any weights: the source's config.json and tokenizer are read, so
    a wrong path, an unsupported architecture or a tokenizer that does not fit fails here, naming the key."""
    m = cfg.model
    if m.path and m.init_from and m.path != m.init_from:
        raise ConfigError(f"model.init_from: an alias of model.path; both are set ({m.init_from!r}, {m.path!r})")
    for key in ("mtp_layers", "num_mtp_layers"):
        value = getattr(m, key)
        if value is not None and value < 0:
            raise ConfigError(f"model.{key}: must be >= 0, got {value}")
    if m.mtp_warmup_steps < 0:
        raise ConfigError(f"model.mtp_warmup_steps: must be >= 0, got {m.mtp_warmup_steps}")
    mtp_layers = m.num_mtp if m.num_mtp is not None else 1
    if m.source is not None:
        from r1engine.models.source import ModelSourceError, inspect_source

        try:
            source = inspect_source(m.source, m.tokenizer, key="model.path" if m.path else "model.init_from")
        except ModelSourceError as exc:
            raise ConfigError(str(exc)) from exc
        mtp_layers = m.num_mtp if m.num_mtp is not None else source.config.num_mtp_layers
        chat = cfg.data.template in ("chat", "r1_zero_chat")
        if chat and not getattr(source.tokenizer, "chat_template", None):
            raise ConfigError(f"data.template: {cfg.data.template!r} needs a tokenizer with a chat template; the "
                              "model's has none")  # fmt: skip
    elif m.tokenizer is not None:
        raise ConfigError("model.tokenizer: applies with model.path (the presets use the character tokenizer)")
    elif cfg.data.template in ("chat", "r1_zero_chat"):
        raise ConfigError(
            f"data.template: {cfg.data.template!r} needs a model.path whose tokenizer has a chat template"
        )
    if mtp_layers == 0 and cfg.rollout.num_speculative_tokens > 0:
        raise ConfigError(
            f"rollout.num_speculative_tokens: MTP speculation ({cfg.rollout.num_speculative_tokens} tokens) needs MTP "
            "layers, but the model has none: attach some with model.mtp_layers=1, or set "
            "rollout.num_speculative_tokens=0"
        )
    if mtp_layers == 0 and m.mtp_warmup_steps > 0:
        raise ConfigError("model.mtp_warmup_steps: needs MTP layers (model.mtp_layers >= 1)")


# --- loading ---------------------------------------------------------------------------------------------------


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Type-check and validate a nested dict (as read from YAML) into a Config."""
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply `key=value` overrides, type-check and validate."""
    cfg = load_dataclass(Config, path, overrides)
    validate(cfg)
    return cfg
