"""The GRPO trainer: the paper's decoupled loop, as glue over the engine's pieces.

rollout (G completions per prompt, MTP speculation) ──► rewards, scored asynchronously in worker processes
        │                                               while the old/reference log-probs are inferred
        ▼
group advantages ─► packing (best-fit chunks) ─► fused GRPO loss (+ MTP loss) ─► optimizer, per mini-batch
        ▼
weight sync to the rollout engine (main model and MTP head) ─► every K steps the reference becomes the policy
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from r1engine.algo.advantages import AdvantageInputs, advantage_estimator, compute_advantages
from r1engine.algo.dapo import overlong_penalty, truncated_completions
from r1engine.algo.loss import loss_share, sequences_with_gradient
from r1engine.data import DataError, DatasetTask, PromptTemplate, get_task
from r1engine.data.problem import NumberedStream, Problem
from r1engine.models import PolicyConfig, PolicyModel, TextCodec, build_char_tokenizer
from r1engine.models.checkpoint import resize_mtp_layers
from r1engine.models.source import check_tokenizer_fits, inspect_source
from r1engine.models.tokenizer import stop_token_ids
from r1engine.packing import PackedBatch, plan
from r1engine.reward_models.routing import split_weights
from r1engine.rewards import RewardScheduler
from r1engine.rewards.registry import accepts_option
from r1engine.rewards.routing import RewardRoutes
from r1engine.rewards.sandbox import SandboxUnavailable
from r1engine.rollout import create_engine
from r1engine.rollout.base import RolloutBatch
from r1engine.trainer.async_rollout import RolloutProcessLost, RolloutScheduler
from r1engine.trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    rng_state,
    set_rng_state,
    writable_output_dir,
)
from r1engine.trainer.config import Config, ConfigError, GRPOConfig, ModelConfig, RolloutConfig
from r1engine.trainer.distributed import (
    broadcast_module,
    broadcast_object,
    init_distributed,
    reduce_metrics,
    sum_across_ranks,
    training_device,
)
from r1engine.trainer.dynamic_sampling import ScoredGroups, sample_informative_groups
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.evaluation import Correctness, held_out_accuracy
from r1engine.trainer.loss_path import head_policy_loss, resolve_loss_path
from r1engine.trainer.metrics import MetricsLogger, plot_metrics, read_metrics
from r1engine.trainer.model_rewards import ModelRewards, rule_routes
from r1engine.trainer.mtp_warmup import mtp_warmup
from r1engine.trainer.script_guard import check_main_guard
from r1engine.trainer.sequences import (
    PackedTokens,
    SequenceBatch,
    build_sequences,
    loss_tokens,
    pack,
    packed_forward,
    packed_logprobs,
    packed_mtp_loss,
    per_sequence,
)
from r1engine.trainer.sft import cold_start_sft

PRESETS = {"tiny": PolicyConfig.tiny, "demo": PolicyConfig.demo}

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def build_task(cfg: Config, dataset: Any = None):
    """The task of a config: `dataset` (a `DatasetTask`, a `datasets.Dataset` or a list of row dicts, read with the
    `data.*` keys), else the data set of `data.train_files`, else the built-in generator `task.name`."""
    d, t = cfg.data, cfg.task
    if isinstance(dataset, DatasetTask):
        return dataset
    if dataset is not None or d.train_files:
        return DatasetTask(
            [dataset] if dataset is not None else d.train_files, d.eval_files, prompt_key=d.prompt_key,
            answer_key=d.answer_key, source_key=d.source_key, eval_size=d.eval_size, shuffle=d.shuffle,
        )  # fmt: skip
    if t.name == "countdown":
        return get_task(t.name, min_numbers=t.min_numbers, max_numbers=t.max_numbers, num_eval=t.num_eval)
    return get_task(t.name, min_digits=t.min_digits, max_digits=t.max_digits, num_eval=t.num_eval)


def reward_options(cfg: Config, template: PromptTemplate) -> dict[str, dict[str, Any]]:
    """`rewards.options`, with the format reward told when the template's prompt ends inside the thought."""
    options = {k: dict(v) for k, v in cfg.rewards.options.items()}
    uses_format = "format" in cfg.rewards.weights or any("format" in w for w in cfg.rewards.routes.values())
    if template.think_in_prompt and uses_format:
        options.setdefault("format", {}).setdefault("think_in_prompt", True)
    used = set(cfg.rewards.weights).union(*cfg.rewards.routes.values())
    for name in sorted(used):  # rewards that run programs learn whether the weak sandbox is acceptable
        if accepts_option(name, "allow_weak_sandbox"):
            options.setdefault(name, {}).setdefault("allow_weak_sandbox", cfg.rewards.allow_weak_sandbox)
    return options


def build_policy(cfg: ModelConfig, vocab_size: int, seed: int) -> PolicyModel:
    """The policy a config names: `model.path`'s weights (MTP layers attached as `model.mtp_layers` says), else a
    fresh `model.preset` model seeded with `seed`."""
    if cfg.source:
        return PolicyModel.from_pretrained(cfg.source, num_mtp_layers=cfg.num_mtp, mtp_init=cfg.mtp_init, seed=seed)
    n_mtp = cfg.num_mtp if cfg.num_mtp is not None else 1
    model = PolicyModel(PRESETS[cfg.preset](vocab_size=vocab_size, num_mtp_layers=n_mtp))
    model.reset_parameters(seed=seed)
    return model


def build_policy_and_codec(
    cfg: ModelConfig,
    seed: int,
    model: PolicyModel | Any = None,
    tokenizer: Any = None,
    template: PromptTemplate | None = None,
) -> tuple[PolicyModel, TextCodec]:
    """The policy and its text codec: the caller's `model` (a PolicyModel or a transformers causal LM) and
    `tokenizer`, else `model.path` with its own tokenizer (or `model.tokenizer`), else a preset with the character
    tokenizer of the built-in tasks. `template` renders the prompts (plain text by default)."""
    templ = {"template": template} if template is not None else {}
    if model is not None:
        if not isinstance(model, PolicyModel):
            model = PolicyModel.from_hf_model(model, num_mtp_layers=cfg.num_mtp, mtp_init=cfg.mtp_init, seed=seed)
        elif cfg.num_mtp is not None and cfg.num_mtp != model.config.num_mtp_layers:
            model = resize_mtp_layers(model, cfg.num_mtp, cfg.mtp_init, seed)
        if tokenizer is None:
            tokenizer = build_char_tokenizer()
            if len(tokenizer) > model.config.vocab_size or model.config.source_config is not None:
                raise ValueError("tokenizer: a model passed to the trainer needs its tokenizer (tokenizer=...)")
        check_tokenizer_fits(tokenizer, model.config, "tokenizer")
        stops = stop_token_ids(tokenizer, model.config.generation_config, {"eos_token_id": model.config.eos_token_id})
        return model, TextCodec(tokenizer, stops if model.config.source_config is not None else None, **templ)
    if tokenizer is not None:
        raise ValueError("tokenizer: passed without model=...; set model.tokenizer in the config instead")
    if cfg.source:
        source = inspect_source(cfg.source, cfg.tokenizer)
        return build_policy(cfg, source.config.vocab_size, seed), TextCodec(source.tokenizer, source.stop_ids, **templ)
    tokenizer = build_char_tokenizer()
    return build_policy(cfg, len(tokenizer), seed), TextCodec(tokenizer, **templ)


def clipped_policy_loss(
    model: PolicyModel,
    batch: PackedBatch,
    tokens: PackedTokens,
    *,
    advantages: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    cfg: GRPOConfig,
    loss_backend: str = "auto",
    policy_weight: float = 1.0,
    mtp_weight: float = 1.0,
    loss_path: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's training loss on a packed batch: the fused clipped surrogate (+ KL to `ref` when given) and the
    MTP head's loss. `advantages`, `old`, `ref`: one value per loss token (`tokens`), on any device; `old=None` is an
    on-policy step (ratio 1: the weights that sampled are the ones trained); the KL term is off without `ref`.
    `policy_weight` / `mtp_weight` scale the two losses (a micro-batch's share of its batch's loss). `loss_path`:
    `training.loss_path` ("logits": materialised logits, in-place backward; "lm_head_fused": the loss reads the hidden
    states and lm_head.weight; "auto": "logits", as measured; see r1engine.trainer.loss_path).
    Returns (total loss, metrics); the caller runs backward and the optimizer step."""
    device = model.device
    out = packed_forward(model, batch)
    params = cfg.loss_params(with_kl=ref is not None)
    sampler = None
    if params.rollout_correction is not None:  # the rollout engine's log-probs of the same tokens
        sampler = batch.fields["sampler_logprobs"].reshape(-1)[tokens.index].to(device)
    loss, m = head_policy_loss(
        model.lm_head,
        out.hidden[tokens.index.to(device)],
        tokens.targets.to(device),
        advantages.to(device),
        old.to(device) if old is not None else None,
        ref.to(device) if ref is not None else None,
        params=params,
        sampler_logprobs=sampler,
        segment_ids=tokens.segment_ids.to(device),
        loss_path=loss_path,
        loss_backend=loss_backend,
    )
    mtp = packed_mtp_loss(model, batch, out, cfg.mtp_loss_coef)
    if policy_weight != 1.0 or mtp_weight != 1.0:
        loss, mtp = loss * policy_weight, mtp * mtp_weight
    stats = {
        "loss/policy": float(loss.detach()),
        "loss/mtp": float(mtp.detach()),
        "loss/clip_frac": float(m.clip_frac),
        "loss/kl_mean": float(m.kl_mean),
        "loss/ratio_mean": float(m.ratio_mean),
        "loss/entropy": float(m.entropy_mean),  # from the loss's own vocabulary pass (LossParams.track_entropy)
    }
    if m.is_ratio_mean is not None:
        stats["loss/rollout_is_ratio_mean"] = float(m.is_ratio_mean)
        stats["loss/rollout_is_corrected_frac"] = float(m.is_corrected_frac)
    return loss + mtp, stats


def grpo_train_step(
    model: PolicyModel,
    train_engine: TrainEngine,
    seqs: SequenceBatch,
    *,
    old: list[torch.Tensor] | None,
    ref: list[torch.Tensor] | None,
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    chunk_len: int,
    loss_backend: str = "auto",
    pad_id: int = 0,
    micro_batch_tokens: int | None = None,
    loss_path: str = "auto",
) -> dict[str, float]:
    """One optimizer step of GRPO on a mini-batch of sequences: pack, forward, fused loss (+ MTP loss), backward,
    step. Sequences without a gradient are left out (`GRPOConfig.skip_zero_advantage`); with `micro_batch_tokens`
    the rest run forward + backward in groups of at most that many packed tokens, their losses weighted by their
    share of the mini-batch's (`loss_share`), the gradients accumulated: one step, the activations of one group.

    `old`/`ref`: per-sequence, position-aligned log-probs (as `SequenceBatch` fields; `old=None`: on-policy);
    `advantages`: one per sequence; `loss_path`: `training.loss_path` (r1engine.trainer.loss_path). Usable on its own
    by any trainer that owns a `PolicyModel` and a `TrainEngine`.
    """
    loss_path = resolve_loss_path(loss_path, zero_stage=train_engine.zero_stage, loss_backend=loss_backend)
    counts = torch.tensor([int((m > 0).sum()) for m in seqs.loss_mask])  # loss tokens per sequence
    keep = _sequences_to_train(model, counts, advantages, with_kl=ref is not None and cfg.beta > 0, cfg=cfg)
    groups = micro_batches(seqs.lengths[keep], chunk_len, micro_batch_tokens)
    sums: dict[str, float] = {}
    for group in groups:
        index = [keep[i] for i in group]
        whole = len(index) == len(seqs)
        policy_weight = 1.0 if whole else loss_share(counts, index, cfg.agg, max_len=cfg.max_new_tokens)
        mtp_weight = 1.0 if whole else loss_share(counts, index, "token-mean")
        sub = seqs if whole else seqs.subset(index)
        extra = {name: [v[i] for i in index] for name, v in (("old", old), ("ref", ref)) if v is not None}
        batch, _ = pack(sub, chunk_len, fields=extra, pad_id=pad_id)
        tokens = loss_tokens(batch)  # gathered on the host: only [M] values travel to the model's device
        total, stats = clipped_policy_loss(
            model,
            batch,
            tokens,
            advantages=advantages[torch.tensor(index)][tokens.seq_ids],
            old=batch.fields["old"].reshape(-1)[tokens.index] if old is not None else None,
            ref=batch.fields["ref"].reshape(-1)[tokens.index] if ref is not None else None,
            cfg=cfg,
            loss_backend=loss_backend,
            policy_weight=policy_weight,
            mtp_weight=mtp_weight,
            loss_path=loss_path,
        )
        train_engine.backward(total)
        # the losses add up over the micro-batches; the other metrics are token means over the trained sequences
        share = len(tokens.index) / max(1, int(counts[keep].sum()))
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + (value if key in ("loss/policy", "loss/mtp") else value * share)
    sums["loss/grad_norm"] = train_engine.step()
    sums["train/skipped_seq_frac"] = 1.0 - len(keep) / len(seqs)
    sums["train/micro_batches"] = float(len(groups))
    return sums


def micro_batches(lengths: torch.Tensor, chunk_len: int, max_tokens: int | None) -> list[list[int]]:
    """Sequences (positions in `lengths`) grouped for forward + backward passes of at most `max_tokens` packed
    tokens each (whole chunks of `chunk_len`, at least one), following the best-fit packing plan; one group when
    `max_tokens` is None."""
    everyone = list(range(len(lengths)))
    if max_tokens is None:
        return [everyone]
    chunks = plan(lengths, chunk_len, 1)
    per_group = max(1, max_tokens // chunk_len)
    if chunks.num_chunks <= per_group:
        return [everyone]
    groups = []
    for first in range(0, chunks.num_chunks, per_group):
        lo, hi = int(chunks.chunk_ptr[first]), int(chunks.chunk_ptr[min(first + per_group, chunks.num_chunks)])
        groups.append(sorted(chunks.seq_index[lo:hi].tolist()))
    return groups


def _sequences_to_train(
    model: PolicyModel, loss_tokens: torch.Tensor, advantages: torch.Tensor, *, with_kl: bool, cfg: GRPOConfig
) -> list[int]:
    """The sequences the step must run forward and backward (see `sequences_with_gradient`): all of them when the
    KL term or the MTP loss reads every sequence."""
    if not cfg.skip_zero_advantage or with_kl or (cfg.mtp_loss_coef > 0 and model.config.num_mtp_layers > 0):
        return list(range(len(loss_tokens)))
    return sequences_with_gradient(advantages, loss_tokens, cfg.agg, max_len=cfg.max_new_tokens)[0]


def worker_device(rollout: RolloutConfig, training_device: torch.device) -> str | None:
    """The device of a rollout worker process's native engine: `rollout.device`, else the training device when
    that is a GPU (the default "shares the training device"; a worker would otherwise load its weights onto the CPU),
    else None (the worker's default: the CPU). vLLM places itself."""
    if rollout.device is not None:
        return rollout.device
    if training_device.type == "cuda" and rollout.backend != "vllm":
        return str(training_device)
    return None


def _named_reward_fns(reward_fns: Mapping[str, Callable] | Sequence[Callable] | None) -> dict[str, Callable]:
    if reward_fns is None:
        return {}
    if isinstance(reward_fns, Mapping):
        return dict(reward_fns)
    named = {getattr(fn, "__name__", ""): fn for fn in reward_fns}
    if "" in named or len(named) != len(reward_fns):
        raise ValueError("reward_fns: a list needs functions with distinct __name__s; pass a {name: fn} dict instead")
    return named


def advantage_metrics(advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `adv/*` metrics of a step's advantages."""
    return {
        "adv/mean": advantages.mean(),
        "adv/abs_mean": advantages.abs().mean(),
        "adv/zero_frac": (advantages == 0).float().mean(),
    }


def _columns(rows: list) -> dict[str, list[Any]]:
    """The rows' other data-set fields, one list per column (None where a row lacks one), for custom rewards."""
    names = sorted({k for p in rows for k in p.extra})
    return {k: [p.extra.get(k) for p in rows] for k in names}


class GRPOTrainer:
    algorithm = "GRPO"
    """Shown in progress bars and plot titles (subclasses such as the PPO baseline rename it)."""
    needs_old_logprobs = False
    """Whether the old policy's log-probs are needed even when each rollout gets a single optimizer step (PPO puts
    them in its reward)."""
    has_value_model = False
    """Whether this trainer owns a value model, which the advantage estimators that `needs_values` (grpo.advantage=gae)
    read: the PPO trainer does (`r1engine.trainer.create_trainer` picks the trainer for the config)."""

    def __init__(
        self,
        cfg: Config,
        *,
        model: PolicyModel | Any = None,
        tokenizer: Any = None,
        dataset: Any = None,
        reward_fns: Mapping[str, Callable] | Sequence[Callable] | None = None,
        progress: bool = True,
    ):
        """Pieces from the caller instead of the config's:

        `model` / `tokenizer`: a `PolicyModel` or a transformers causal LM of a supported family, and its
        tokenizer. `dataset`: a `datasets.Dataset`, a list of row dicts or a `DatasetTask` (columns named by
        `data.*` as for files). `reward_fns`: reward functions `fn(completions, references, **columns)` by name (or a
        list, named by `__name__`); they form the default route, weighted by `rewards.weights` where it names them
        and 1 otherwise (`rewards.routes` still apply). They must be module-level functions: the reward workers are
        separate processes."""
        check_main_guard(type(self).__name__)
        if advantage_estimator(cfg.grpo.advantage, key="grpo.advantage").needs_values and not self.has_value_model:
            raise ConfigError(
                f"grpo.advantage: {cfg.grpo.advantage!r} needs a value model, which {type(self).__name__} has not: "
                "build the trainer with r1engine.trainer.create_trainer(cfg) (the PPO trainer)"
            )
        self.cfg = cfg
        self.progress = progress
        seed_everything(cfg.seed, cfg.training.deterministic)
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        self.out_dir = writable_output_dir(cfg.output_dir)  # a ConfigError naming output_dir and why
        self.task = build_task(cfg, dataset)
        self.template = PromptTemplate(cfg.data.template, cfg.data.system_prompt)
        self.model, self.codec = build_policy_and_codec(cfg.model, cfg.seed, model, tokenizer, self.template)
        self.data_stats: dict[str, int] = {}
        if isinstance(self.task, DatasetTask):  # a prompt must leave room for a completion in a packed chunk
            limit = min(cfg.data.max_prompt_tokens or cfg.training.chunk_len - 1, cfg.training.chunk_len - 1)
            self.data_stats = self.task.drop_long_prompts(
                lambda prompt: len(self.encode(prompt)), limit, cfg.data.overlong_prompts
            )
        self.stream = NumberedStream(self.task.train_problems(seed=cfg.seed))
        functions = _named_reward_fns(reward_fns)
        default = {n: cfg.rewards.weights.get(n, 1.0) for n in functions} if functions else cfg.rewards.weights
        routes = RewardRoutes(default, cfg.rewards.routes)
        sources = self.task.sources if isinstance(self.task, DatasetTask) else {self.task.name}
        try:
            routes.check_sources(sources)  # before any rollout: a row nobody can score
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        # the rule rewards go to the reward workers, the `rm:<name>` ones to the reward models (ModelRewards)
        rule_default, rule_sources = rule_routes(routes)
        if not rule_default and not rule_sources:
            raise ConfigError(
                "rewards.routes: every route names only reward models; at least one needs rule rewards (they judge "
                "the held-out accuracy)"
            )
        rules = RewardRoutes(rule_default, rule_sources)
        has_rules = {s: bool(split_weights(routes.weights(routes.route_of(s)))[0]) for s in sources}
        # the held-out accuracy is rule-checked: rows whose route has only reward models are not evaluated
        self._eval_problems = [p for p in self.task.eval_problems if has_rules.get(p.source, True)]
        self._eval_sources = sorted({p.source for p in self._eval_problems})
        # custom rewards may take the row's other fields
        self._pass_columns = bool(functions) or any(":" in name for name in rules.names)
        self.tokenizer = self.codec.tokenizer
        self.eos_id = self.codec.eos_id
        self.rank, self.world_size = init_distributed()
        self.device = training_device(cfg.training.device)
        self.model.to(device=self.device, dtype=getattr(torch, cfg.model.dtype))
        if self.world_size > 1 and cfg.training.deepspeed_zero_stage == 0:
            raise ValueError(
                f"training.deepspeed_zero_stage: {self.world_size} ranks train through DeepSpeed; set a ZeRO stage "
                "(1-3), 0 is single-process PyTorch"
            )
        if cfg.grpo.prompts_per_step % self.world_size:
            raise ValueError(
                f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} must be divisible by the number of ranks "
                f"({self.world_size})"
            )
        # Built in `run`, after the cold-start SFT: ZeRO partitions the weights it is handed.
        self.train_engine: TrainEngine | None = None
        self.ref_model: PolicyModel | None = None
        self.rollout = None
        self.rollout_scheduler: RolloutScheduler | None = None  # batches in flight (rollout.mode one_step_off, async)
        options = {k: v for k, v in reward_options(cfg, self.template).items() if k in rules.names}
        try:
            self.rewards = RewardScheduler(
                {"weights": rule_default, "routes": rule_sources, "options": options, "functions": functions},
                num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s,
            )  # fmt: skip
        except SandboxUnavailable as exc:  # a code reward without a sandbox that contains programs
            raise ConfigError(str(exc)) from None
        self.correct = Correctness(rules, options, functions)
        self.model_rewards = ModelRewards(cfg, routes, self.device) if len(rules.names) < len(routes.names) else None
        self.checkpoints = CheckpointManager(self.out_dir, keep=cfg.checkpoint.keep, rank=self.rank)
        self.step = 0
        self.sft_losses: list[float] = []

    # ------------------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.codec.encode(text, bos)

    def decode(self, ids: list[int]) -> str:
        return self.codec.decode(ids)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- stages
    def _start_training(self) -> None:
        """The optimizer side (AdamW, or DeepSpeed across ranks); every rank starts from rank 0's weights."""
        g = self.cfg.grpo
        broadcast_module(self.model)
        self.train_engine = TrainEngine(
            self.model,
            lr=g.lr,
            weight_decay=g.weight_decay,
            max_grad_norm=g.max_grad_norm,
            zero_stage=self.cfg.training.deepspeed_zero_stage,
            offload_optimizer=self.cfg.training.offload_optimizer,
        )

    def _start_rollout(self) -> None:
        r = self.cfg.rollout
        weights = self.train_engine.full_weights() if self.train_engine is not None else contextlib.nullcontext()
        with weights:
            if r.is_remote:  # the engine in a worker process of its own (r1engine.rollout.remote)
                from r1engine.rollout.external import format_address, parse_address
                from r1engine.rollout.pool import RolloutPool
                from r1engine.rollout.remote import RemoteRolloutEngine

                def worker(w: int, group=None, model_dir: str | None = None) -> RemoteRolloutEngine:
                    listen = None
                    if r.listen:  # worker w of rank r on port + r * workers + w
                        host, port = parse_address(r.listen, "rollout.listen")
                        listen = format_address(host, port + self.rank * r.workers + w)
                        log.warning("rank %d waits for a rollout worker on %s (r1engine rollout-worker --connect %s)",
                                    self.rank, listen, listen)  # fmt: skip
                    return RemoteRolloutEngine(
                        r.backend, model_dir=model_dir, model=self.model, tokenizer=self.tokenizer,
                        num_speculative_tokens=r.num_speculative_tokens, max_model_len=self.cfg.training.chunk_len,
                        vllm_log_level=r.vllm_log_level, device=worker_device(r, self.device),
                        num_threads=r.num_threads or None,
                        listen=listen, **({"group": group, "rank": w + 1} if group is not None else {}),
                    )  # fmt: skip

                if r.workers == 1:
                    self.rollout = worker(0)
                    return
                # the workers start from one copy of the weights on disk (each engine would write its own)
                with tempfile.TemporaryDirectory(prefix="r1engine-rollout-") as start_dir:
                    self.model.save_pretrained(start_dir, self.tokenizer)
                    self.rollout = RolloutPool.start(
                        r.workers, lambda w, group: worker(w, group, start_dir), model=self.model
                    )
                return
            self.rollout = create_engine(
                r.backend,
                model=self.model,
                tokenizer=self.tokenizer,
                num_speculative_tokens=r.num_speculative_tokens,
                max_model_len=self.cfg.training.chunk_len,
                vllm_log_level=r.vllm_log_level,
                **({"device": r.device} if r.device is not None else {}),
            )

    def _rollout_scheduler(self) -> RolloutScheduler:
        """rollout.mode one_step_off / async: the scheduler of the batches sampled ahead, the engine told the
        trainer's version (the step: a resumed run, or an MTP warm-up that synced, starts elsewhere than 0)."""
        r = self.cfg.rollout
        if self.rollout.version != self.step:
            with self.train_engine.full_weights():
                self.rollout.sync_weights(self.model, version=self.step)
        return RolloutScheduler(
            self.rollout,
            lookahead=r.max_staleness if r.mode == "async" else 1,
            max_staleness=r.max_staleness,
            take=self._take_problems,
            encode=lambda p: self.encode(p.prompt),
            sampling=self._sampling_args,
            score=self._score_rollout,
            stream_state=self.stream.state,
            last_step=self.cfg.grpo.steps,
            segment_tokens=r.segment_length(self.cfg.grpo.max_new_tokens),
            sync_steps=r.sync_warmup_steps,
        )

    def _cold_start(self) -> None:
        """Cold-start SFT on rank 0; the other ranks receive its weights and data position."""
        cfg = self.cfg
        if self.is_main:
            self.sft_losses = cold_start_sft(
                self.model, self.task, self.stream, self.encode, self.eos_id,
                steps=cfg.sft.steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr,
                chunk_len=cfg.training.chunk_len, mtp_coef=cfg.grpo.mtp_loss_coef,
                loss_backend=cfg.training.loss_backend, progress=self.progress,
            )  # fmt: skip
        self.sft_losses = broadcast_object(self.sft_losses)
        self.stream.set_state(broadcast_object(self.stream.state()))

    def _warm_up_mtp(self) -> dict[str, float]:
        """Rank 0 trains the MTP layers alone on the policy's samples (`model.mtp_warmup_steps`) before the training
        engine exists; the other ranks receive the result with the weights in `_start_training`."""
        m, g = self.cfg.model, self.cfg.grpo
        metrics: dict[str, float] = {}
        if self.is_main:
            self._start_rollout()
            # prompts of their own stream: the RL steps see the same data with or without a warm-up
            problems = self.task.train_problems(seed=self.cfg.seed + 7919)
            prompts = (self.encode(p.prompt) for p in problems)
            with self._rollout_awake():
                result = mtp_warmup(
                    self.model, self.rollout, prompts, steps=m.mtp_warmup_steps, lr=m.mtp_warmup_lr,
                    prompts_per_step=max(1, g.prompts_per_step // self.world_size), samples_per_prompt=g.group_size,
                    max_new_tokens=g.max_new_tokens, stop_token_ids=self.codec.stop_ids,
                    chunk_len=self.cfg.training.chunk_len, seed=self.cfg.seed + 7919, pad_id=self.codec.pad_id,
                    temperature=g.temperature, progress=self.progress,
                )  # fmt: skip
            metrics = result.metrics()
            self._say(
                f"MTP warm-up: {m.mtp_warmup_steps} steps, MTP loss {metrics['mtp_warmup/loss_first']:.3f} -> "
                f"{metrics['mtp_warmup/loss_last']:.3f}, draft acceptance {result.acceptance_before:.3f} -> "
                f"{result.acceptance_after:.3f}"
            )
        return broadcast_object(metrics)

    @contextlib.contextmanager
    def _rollout_awake(self):
        """The rollout engine holds its device memory only inside this block when offloading between stages
        (rollout and training share devices); a no-op on CPU."""
        r = self.cfg.rollout
        rollout_device = torch.device(r.device) if r.device is not None else self.device
        # "cuda" and "cuda:0" name the same device here (an index-less name means the first one)
        shared = (rollout_device.type, rollout_device.index or 0) == (self.device.type, self.device.index or 0)
        offload = r.offload_between_stages and shared and r.mode == "sync"  # else both run at once
        if offload:
            self.rollout.onload()
        try:
            yield self.rollout
        finally:
            if offload:
                self.rollout.offload()

    def _reset_reference(self) -> None:
        if self.cfg.grpo.beta > 0:
            with self.train_engine.full_weights():
                self.ref_model = self.model.frozen_copy()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pass@1 (mean over `eval.samples` sampled completions per problem) and greedy accuracy; each
        rank scores its share of the problems."""
        with self._rollout_awake() as rollout:
            return held_out_accuracy(
                rollout.generate,
                self._eval_problems[self.rank :: self.world_size],
                self.encode,
                self.decode,
                self.correct,
                cfg=self.cfg.eval,
                max_new_tokens=self.cfg.grpo.max_new_tokens,
                stop_token_ids=self.codec.stop_ids,
                sum_over_ranks=sum_across_ranks,
                sources=self._eval_sources,
            )

    def _roll_out(
        self, problems: list[Problem], step: int, round_: int = 0
    ) -> tuple[list[list[int]], RolloutBatch, Any]:
        """G completions of each of `problems` (this rank's), their scoring submitted: (prompt ids, rollout, reward
        handle). Each round of a step (`round_`, with dynamic sampling) samples with a seed of its own."""
        prompts = [self.encode(p.prompt) for p in problems]
        with self._rollout_awake():
            rb = self.rollout.generate(prompts, **self._sampling_args(step, round_))
        return prompts, rb, self._score_rollout(problems, rb, step)

    def _sampling_args(self, step: int, round_: int = 0) -> dict[str, Any]:
        """The rollout engine's sampling arguments of a step's batch (its seed: the step's, the rank's, the round's)."""
        cfg, g = self.cfg, self.cfg.grpo
        return dict(
            n=g.group_size,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            stop_token_ids=self.codec.stop_ids,
            seed=cfg.seed * 1_000_003 + step * self.world_size + self.rank + round_ * 0x9E3779B1,
        )

    def _score_rollout(self, problems: list[Problem], rb: RolloutBatch, step: int) -> Any:
        """Submit the rewards of rollout `rb` of `problems` (scored in the background); returns their handle."""
        texts = [self.decode(c) for c in rb.completion_ids]
        rows = [problems[i] for i in rb.prompt_index.tolist()]
        columns = _columns(rows) if self._pass_columns else None
        if self.model_rewards is None:
            handle = self.rewards.submit(texts, [p.answer for p in rows], sources=[p.source for p in rows],
                                         columns=columns)  # fmt: skip
            return handle
        # rule rewards for the rows whose route has them, then the reward models (both overlap the inference)
        keep = [i for i, p in enumerate(rows) if self.model_rewards.has_rules(p.source)]
        rule_handle = None
        if keep:
            rule_handle = self.rewards.submit(
                [texts[i] for i in keep],
                [rows[i].answer for i in keep],
                sources=[rows[i].source for i in keep],
                columns={k: [v[i] for i in keep] for k, v in columns.items()} if columns else None,
            )
        owner = rb.prompt_index.tolist()
        return self.model_rewards.submit(rule_handle, keep, texts, rows, owner, step)

    def _overlong_penalty(self, rb: RolloutBatch) -> torch.Tensor:
        """`dapo.overlong_buffer_len`'s penalty of each completion of `rb` (zeros when off)."""
        d = self.cfg.dapo
        lengths = torch.tensor([len(c) for c in rb.completion_ids])
        return overlong_penalty(lengths, self.cfg.grpo.max_new_tokens, d.overlong_buffer_len, d.overlong_penalty_factor)

    def _dynamic_sampling(self, first: ScoredGroups, step: int) -> tuple[ScoredGroups, dict[str, float]]:
        """`dapo.dynamic_sampling`: the step's groups whose rewards vary, sampling more prompts in rounds."""
        g = self.cfg.grpo

        def sample(round_: int, n: int, generate: bool) -> ScoredGroups | None:
            # every rank takes alike; in the off-policy modes behind the batches in flight, trained before them
            ahead = self.rollout_scheduler is not None
            problems = self.stream.take(n * self.world_size, out_of_order=ahead)[self.rank :: self.world_size]
            if not generate:
                return None
            prompts, rb, handle = self._roll_out(problems, step, round_)
            scored = handle.result()
            return ScoredGroups(problems, prompts, rb, scored, torch.tensor(scored.scores) + self._overlong_penalty(rb))

        return sample_informative_groups(
            first, sample, needed=len(first.problems), group_size=g.group_size,
            max_rounds=self.cfg.dapo.max_sampling_rounds, rank=self.rank, num_ranks=self.world_size,
            sum_across_ranks=sum_across_ranks,
        )  # fmt: skip

    def _take_problems(self, step: int) -> list[Problem]:
        """This rank's problems of a step's batch (every rank takes the whole batch from its stream alike)."""
        return self.stream.take(self.cfg.grpo.prompts_per_step)[self.rank :: self.world_size]

    def generate_and_score(self, step: int) -> tuple[SequenceBatch, dict[str, Any], dict[str, Any]]:
        """One rollout: G completions for this rank's prompts, rewards (async) overlapped with inference of the
        old and reference log-probs; returns the sequences, their training fields (per-sequence old/ref log-probs
        and advantages) and metrics. DAPO's `dapo.*` options: dynamic sampling (scored first, more prompts until
        the groups vary), truncated completions left out of the loss, the overlong penalty added to the rewards.
        `rewards.overlap` off: the rewards are awaited before the inference instead (same results, other timing)."""
        cfg, g, d = self.cfg, self.cfg.grpo, self.cfg.dapo
        problems = self._take_problems(step) if self.rollout_scheduler is None else None
        t0 = time.perf_counter()
        if self.rollout_scheduler is None:
            prompts, rb, handle = self._roll_out(problems, step)  # scored while we infer below
        else:  # rollout.mode one_step_off / async: the batch sampled ahead for this step, already being scored
            ahead = self.rollout_scheduler.next(step, version=step)
            problems, prompts, rb, handle = ahead.problems, ahead.prompts, ahead.rollout, ahead.rewards
        scored = first = None
        dapo_metrics: dict[str, float] = {}
        if d.dynamic_sampling:
            first = handle.result()
            groups = ScoredGroups(problems, prompts, rb, first, torch.tensor(first.scores) + self._overlong_penalty(rb))
            groups, dapo_metrics = self._dynamic_sampling(groups, step)
            problems, prompts, rb, scored = groups.problems, groups.prompts, groups.rollout, groups.scored
        t_rollout = time.perf_counter() - t0
        t_reward_wait = 0.0
        if scored is None and not cfg.rewards.overlap:  # rewards.overlap off: the rewards before the inference
            scored = handle.result()
            t_reward_wait = time.perf_counter() - t0 - t_rollout
        owner = rb.prompt_index.tolist()

        t1 = time.perf_counter()
        seqs = build_sequences([prompts[i] for i in owner], rb.completion_ids, rb.logprobs)
        if d.mask_truncated_completions:  # DAPO's overlong filtering: no loss tokens
            truncated = truncated_completions(rb.completion_ids, self.codec.stop_ids)
            for i in torch.nonzero(truncated).flatten().tolist():
                seqs.loss_mask[i].zero_()
            dapo_metrics["overlong/masked_frac"] = float(truncated.float().mean())
        batch, pack_stats = pack(seqs, cfg.training.chunk_len, pad_id=self.codec.pad_id)
        tokens = loss_tokens(batch)
        sampler = batch.fields["sampler_logprobs"].reshape(-1)[tokens.index]
        if g.old_logprobs == "sampler":  # the behaviour policy's own log-probs: no inference pass
            old, old_seq = sampler, seqs.sampler_logprobs
        elif g.mini_batches == 1 and g.inner_epochs == 1 and not self.needs_old_logprobs:
            # one optimizer step per rollout: the weights that sampled are the ones trained, so the ratio is 1 and the
            # inference pass would recompute the training forward's own log-probs (grpo_loss with old=None)
            old = old_seq = None
        else:
            self.model.eval()
            with self.train_engine.full_weights():
                old = packed_logprobs(self.model, batch, tokens, g.temperature, cfg.training.loss_backend)
            old_seq = per_sequence(batch, tokens, old, len(seqs))
        ref_seq = None
        if self.ref_model is not None:
            ref = packed_logprobs(self.ref_model, batch, tokens, g.temperature, cfg.training.loss_backend)
            ref_seq = per_sequence(batch, tokens, ref, len(seqs))
        t_infer = time.perf_counter() - t1

        t2 = time.perf_counter()
        scored = handle.result() if scored is None else scored
        first = scored if first is None else first  # what the reward metrics describe
        t_reward_wait += time.perf_counter() - t2
        rewards = torch.tensor(scored.scores, dtype=torch.float32)
        if d.overlong_buffer_len:  # DAPO's soft overlong punishment
            penalty = self._overlong_penalty(rb)
            rewards = rewards + penalty
            dapo_metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
            dapo_metrics["overlong/penalized_frac"] = float((penalty < 0).float().mean())
        advantages = self._sequence_advantages(seqs, rewards)

        lengths = torch.tensor([len(c) for c in rb.completion_ids], dtype=torch.float32)
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(),
            **{f"reward/{name}/mean": float(np.nanmean(v)) for name, v in first.per_function.items()},
            **{k: v for k, v in first.metrics.items() if k.startswith(("reward", "scheduler"))},
            **(advantage_metrics(advantages) if advantages is not None else {}),
            "rollout/response_len_mean": lengths.mean(),
            "rollout/response_len_max": lengths.max(),
            "rollout/truncated_frac": float(np.mean([r == "length" for r in rb.finish_reason])),
            "rollout/tokens_per_s": rb.stats.tokens_per_s,
            "rollout/acceptance_rate": rb.stats.acceptance_rate,
            "rollout/sampler_vs_trainer_logprob_absdiff": (sampler - old).abs().mean()
            if g.old_logprobs == "recompute" and old is not None and not cfg.rollout.filtered
            else None,
            "data/epoch": getattr(self.stream, "epoch", None),
            "time/rollout_s": t_rollout,
            "time/inference_s": t_infer,
            "time/reward_wait_s": t_reward_wait,
            **pack_stats,
            **dapo_metrics,
            **(self.rollout_scheduler.metrics() if self.rollout_scheduler is not None else {}),
        }
        seqs_fields = {"old": old_seq, "ref": ref_seq, "adv": advantages, "rewards": rewards}
        return seqs, seqs_fields, metrics

    def _sequence_advantages(self, seqs: SequenceBatch, rewards: torch.Tensor) -> torch.Tensor | None:
        """`grpo.advantage`'s per-completion advantages `[N]` (batch statistics over every rank's completions, each
        counted once per loss token); None for a token-level estimator, which the trainer with the value model runs."""
        g = self.cfg.grpo
        if advantage_estimator(g.advantage).level != "sequence":
            return None
        lengths = torch.tensor([int(m.sum()) for m in seqs.loss_mask], dtype=torch.long)
        inputs = AdvantageInputs(rewards, g.group_size, lengths=lengths, sum_across_ranks=sum_across_ranks)
        return compute_advantages(g.advantage, inputs).advantages

    def train_on_rollout(self, seqs: SequenceBatch, fields: dict[str, Any], step: int) -> dict[str, Any]:
        """Mini-batch optimizer steps over one rollout (inner epochs x mini-batches)."""
        cfg, g = self.cfg, self.cfg.grpo
        n = len(seqs)
        per_mb = n // g.mini_batches
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        sums: dict[str, float] = {}
        count = 0
        self.model.train()
        for _ in range(g.inner_epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, per_mb * g.mini_batches, per_mb):
                index = order[start : start + per_mb]
                stats = self._train_mini_batch(seqs.subset(index), fields, index)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def _train_mini_batch(self, seqs: SequenceBatch, fields: dict[str, Any], index: list[int]) -> dict[str, float]:
        return grpo_train_step(
            self.model,
            self.train_engine,
            seqs,
            old=[fields["old"][i] for i in index] if fields["old"] is not None else None,
            ref=[fields["ref"][i] for i in index] if fields["ref"] is not None else None,
            advantages=fields["adv"][torch.tensor(index)],
            cfg=self.cfg.grpo,
            chunk_len=self.cfg.training.chunk_len,
            loss_backend=self.cfg.training.loss_backend,
            pad_id=self.codec.pad_id,
            micro_batch_tokens=self.cfg.training.micro_batch_tokens,
            loss_path=self.cfg.training.loss_path,
        )

    def sync_rollout_weights(self) -> None:
        with self.train_engine.full_weights(), self._rollout_awake():
            if self.rollout_scheduler is not None:  # queued behind the generations in flight, without waiting
                self.rollout_scheduler.after_step(self.model, version=self.step + 1)
            else:
                self.rollout.sync_weights(self.model)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trained_stream_state(self) -> Any:
        """The data position after the last batch trained (batches in flight are sampled again on resume), with the
        problems beyond it that were trained already (DAPO's extra rounds in the off-policy modes) to pass over."""
        scheduler = self.rollout_scheduler
        return self.stream.checkpoint_state(
            scheduler.trained_stream_state() if scheduler is not None else self.stream.state()
        )

    def save_checkpoint(self, step: int) -> Path:
        """Every rank calls this: rank 0 writes the model and trainer state, every rank its RNG state and (with
        DeepSpeed) its optimizer partition."""
        state = None
        if self.is_main:
            state = {
                "step": step,
                "world_size": self.world_size,
                "optimizer": self.train_engine.optimizer_state(),
                "stream": self._trained_stream_state(),
                "ref": self.ref_model.state_dict() if self.ref_model is not None else None,
                "sft_losses": self.sft_losses,
                "config": self.cfg.to_dict(),
            }

        def write(directory: Path) -> None:
            with self.train_engine.full_weights():  # collective under ZeRO-3
                if self.is_main:
                    self.model.save_pretrained(directory / "model", self.tokenizer)
            self.train_engine.save_sharded(str(directory / "deepspeed"))  # collective
            torch.save(rng_state(), directory / f"rng-rank{self.rank}.pt")

        return self.checkpoints.save(step, write, state)

    def _read_checkpoint(self, path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The policy weights of checkpoint `path`, read (with this rank's RNG file) before anything of the run is
        changed, so that a damaged checkpoint found here leaves the run free to resume from an older one. A
        checkpoint of another number of ranks raises CheckpointError (not damage: no older one would do either)."""
        if state.get("world_size", 1) != self.world_size:  # partitioned optimizer state and per-rank RNG
            raise CheckpointError(
                f"checkpoint {path} was written by {state.get('world_size', 1)} ranks, this run has "
                f"{self.world_size}: resume with the same number of ranks"
            )
        torch.load(path / f"rng-rank{self.rank}.pt", weights_only=False)
        if self.cfg.training.deepspeed_zero_stage and not (path / "deepspeed").is_dir():
            raise FileNotFoundError("deepspeed/ (the partitioned optimizer state) is missing")
        return PolicyModel.from_pretrained(path / "model", dtype=self.model.dtype).state_dict()

    def _resume_point(self) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
        """(checkpoint, trainer state, weights) to resume from, or None to start from scratch. Rank 0 decides (see
        `CheckpointManager.resume`: the newest intact checkpoint, damaged newer ones set aside; with
        checkpoint.resume=false a previous run is moved into output_dir/previous-N/) and the other ranks read the
        checkpoint it chose. Raises CheckpointError on every rank when a previous run cannot be resumed."""
        decision: tuple[str, str | None] = ("start", None)
        found = None
        if self.is_main:
            try:
                if self.cfg.checkpoint.resume:
                    found = self.checkpoints.resume(self._read_checkpoint)
                    if found is not None:
                        decision = ("resume", found[0].name)
                else:
                    self.checkpoints.set_aside_previous_run()
            except CheckpointError as exc:
                decision = ("error", str(exc))
        decision = broadcast_object(decision)  # rank 0 has moved what it sets aside
        if decision[0] == "error":
            raise CheckpointError(decision[1])
        if decision[0] == "start":
            return None
        if self.is_main:
            return found
        path = self.checkpoints.root / decision[1]
        state = self.checkpoints.read_state(path)
        return path, state, self._read_checkpoint(path, state)

    def _load_training_state(self, path: Path, state: dict[str, Any]) -> None:
        """Optimizer, RNG, data position and reference of checkpoint `path` (the weights are already loaded)."""
        self.train_engine.load_optimizer_state(state["optimizer"])
        self.train_engine.load_sharded(str(path / "deepspeed"))
        self.stream.set_state(state["stream"])
        if state["ref"] is not None:
            self.ref_model = self.model.frozen_copy()
            self.ref_model.load_state_dict(state["ref"])
        self.sft_losses = state["sft_losses"]
        set_rng_state(torch.load(path / f"rng-rank{self.rank}.pt", weights_only=False))
        self.step = state["step"]

    # ------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """The whole run (resumed from output_dir's checkpoint when there is one); returns its summary. A rollout worker
        process that dies raises `RolloutProcessLost`: its message says which checkpoint the run resumes from."""
        from r1engine.rollout.remote import RolloutWorkerDied

        try:
            return self._run()
        except RolloutWorkerDied as exc:
            raise RolloutProcessLost.of(exc, self.step, self.checkpoints) from None

    def _run(self) -> dict[str, Any]:
        cfg, g = self.cfg, self.cfg.grpo
        found = self._resume_point()
        resumed = found is not None
        logger = (
            MetricsLogger(self.out_dir, tensorboard=cfg.tensorboard, resume_step=None)
            if self.is_main and not resumed
            else None
        )
        t_start = time.perf_counter()
        warmup: dict[str, float] = {}
        if resumed:
            checkpoint, state, weights = found
            self.model.load_state_dict(weights)
            del weights, found
        elif cfg.sft.steps:
            self._cold_start()
        if not resumed and cfg.model.mtp_warmup_steps:
            warmup = self._warm_up_mtp()
        self._start_training()
        if resumed:
            self._load_training_state(checkpoint, state)
            if self.is_main:
                logger = MetricsLogger(self.out_dir, tensorboard=cfg.tensorboard, resume_step=self.step)
        else:
            self._reset_reference()
        if self.rollout is None:
            self._start_rollout()
        if cfg.rollout.mode != "sync":
            self.rollout_scheduler = self._rollout_scheduler()
        evaluation = self.evaluate()
        acc = evaluation["eval/accuracy"]
        if not resumed and self.is_main:
            sft_ce = self.sft_losses[-1] if self.sft_losses else None
            logger.log(0, {**evaluation, **warmup, **self.data_stats, "sft/final_ce": sft_ce})
        acc_start = acc if not resumed else self._first_accuracy()
        self._say(f"held-out {'at resume' if resumed else 'before RL'}: {self._describe(evaluation)}")

        bar = tqdm(range(self.step, g.steps), desc=self.algorithm, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, initial=self.step, total=g.steps)  # fmt: skip
        for step in bar:
            t0 = time.perf_counter()
            seqs, fields, record = self.generate_and_score(step)
            t1 = time.perf_counter()
            record.update(self.train_on_rollout(seqs, fields, step))
            record["time/train_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            self.sync_rollout_weights()
            record["time/sync_s"] = time.perf_counter() - t2
            self.step = step + 1
            if g.ref_reset_every and self.step % g.ref_reset_every == 0:
                self._reset_reference()
            if self.step % cfg.eval.every == 0 or self.step == g.steps:
                evaluation = self.evaluate()
                acc = evaluation["eval/accuracy"]
                record.update(evaluation)
            record["time/step_s"] = time.perf_counter() - t0
            record = reduce_metrics(record)
            if self.is_main:
                logger.log(self.step, record)
            bar.set_postfix(reward=f"{float(record['reward/mean']):.2f}", acc=f"{acc:.2f}")
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < g.steps:
                self.save_checkpoint(self.step)
        if not (resumed and self.step == state["step"]):  # else the checkpoint of this step is the one resumed from
            self.save_checkpoint(self.step)
        if logger is not None:
            logger.close()
        summary = {
            "accuracy_before_rl": acc_start,
            "accuracy_after_rl": acc,
            "greedy_accuracy_after_rl": evaluation["eval/greedy_accuracy"],
            "accuracy_gain": acc - acc_start,
            "steps": self.step,
            "wall_s": time.perf_counter() - t_start,
        }
        if self.is_main:
            plot = plot_metrics(
                read_metrics(logger.path),
                self.out_dir / "metrics.png",
                title=f"{self.algorithm} on {self._run_label()}: held-out pass@1 {acc_start:.2f} -> {acc:.2f}",
            )
            summary["plot"] = str(plot)
            self._say(
                f"held-out after RL: {self._describe(evaluation)}; pass@1 {100 * (acc - acc_start):+.1f} points "
                f"during RL | metrics {logger.path} | plot {plot}"
            )
        return summary

    def _run_label(self) -> str:
        """What was trained on what, for the plot's title: the data files (or task) and the model directory."""
        cfg = self.cfg
        if isinstance(self.task, DatasetTask):
            data = ", ".join(Path(str(f)).name for f in cfg.data.train_files) or "the caller's data set"
        else:
            data = cfg.task.name
        return f"{data} ({Path(cfg.model.source).name})" if cfg.model.source else data

    def _describe(self, evaluation: dict[str, float]) -> str:
        e = self.cfg.eval
        return (
            f"pass@1 {evaluation['eval/accuracy']:.3f} ({e.samples} samples at T={e.temperature}, "
            f"top-p {e.top_p}), greedy accuracy {evaluation['eval/greedy_accuracy']:.3f}"
        )

    def _first_accuracy(self) -> float:
        records = read_metrics(self.out_dir / "metrics.jsonl") if (self.out_dir / "metrics.jsonl").exists() else []
        first = next((r["eval/accuracy"] for r in records if r.get("step") == 0), None)
        return first if first is not None else math.nan

    def _say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(f"[r1engine] {text}")

    def close(self) -> None:
        if self.rollout_scheduler is not None:
            self.rollout_scheduler.discard()
        if getattr(self.rollout, "remote", False):  # the worker process
            self.rollout.close()
        self.rewards.close()
        if self.model_rewards is not None:
            self.model_rewards.close()
