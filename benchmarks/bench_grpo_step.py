"""Throughput of one whole GRPO step: packing + fused loss (r1engine) against padding + eager PyTorch loss.

One GRPO step, as the trainer runs it (`r1engine.trainer.grpo`):

1. rollout: the native engine (`create_engine("native")`) samples G completions for each of P random prompts;
2. inference: the old policy's log-probs of every completion token;
3. training: `--mini-batches` optimizer steps (AdamW + grad clipping, `TrainEngine`) over the rollout, each
   forward -> GRPO loss (+ the MTP head's loss) -> backward -> step.

Paths compared on the same rollout (interleaved; the order rotates every repeat):

* `packed+fused` (ours: `grpo_train_step`'s computation, see `packed_fused_step`): sequences packed best-fit into
  `chunk_len` chunks (`r1engine.trainer.sequences.pack` / `packed_forward`: the planner and varlen attention, no
  padding beyond chunk tails), logits only at the loss tokens, fused loss `r1engine.ops.grpo_loss` (backend
  "auto": the C++ kernel on CPU, CUDA/Triton on a GPU); inference packed the same way (`packed_logprobs`).
* `packed+fused-linear` (ours): the same with `r1engine.ops.linear_grpo_loss`, which reads the hidden states
  and the lm_head weight and never writes logits.
* `padded+eager` (baseline): each mini-batch right-padded to its longest sequence, `[B, Lmax]` (causal attention;
  with right padding the causal mask is the attention mask: real tokens never see padding), logits materialised at
  every position, the eager loss `r1engine.algo.loss.grpo_loss_reference` (log_softmax + gather); inference the
  same way (`token_logprobs` over `[B, Lmax, V]`).

All paths start from the same random weights (a deep copy each), get the same rollout, the same advantages and
the same mini-batch split, and use the same optimizer and hyper-parameters (the trainer's `GRPOConfig` defaults,
beta = 0, so no reference model). On the warm-up step the models are still identical, so the first mini-batch's
policy loss, MTP loss, gradient norm and old log-probs must agree across paths: the script records them
(`check` in the result) and the test asserts it.

Lengths. Prompts: random token ids, lengths uniform in [prompt_min, prompt_max]. Completions: the engine decodes
every row to `max_new_tokens` (no stop token: "ignore_eos"), then completion i is cut to a length drawn from a
log-normal (median `median_new_tokens`, sigma `length_sigma` = 0.8: a long right tail, as R1-style responses),
clipped to [1, max_new_tokens], with the longest completion of each rollout set to `max_new_tokens` (a truncated
response, common in R1 training). The native engine steps its whole batch until the longest row ends, so decoding
every row to the cap costs what real EOS stops with a capped longest row would.

Throughput: tokens = real prompt + completion tokens of the rollout (the same count for every path, so tokens/s
ratios are time ratios). `train tokens/s` counts the training phase only; `step tokens/s` the whole step (rollout +
inference + training). Times are medians over `--repeats` steps after `--warmup` steps; on CUDA every phase ends
with `torch.cuda.synchronize()` (phases last seconds, so host timers are exact enough).

Memory: CUDA: `torch.cuda.max_memory_allocated()` during the phase minus what was allocated before it (weights,
optimizer state, engine and the other paths' models excluded), plus the absolute peak. CPU: growth of the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over RSS before the phase, approximate (allocator
caching can hide re-used memory; run as a script, tensors over 1 MiB are mapped one by one so RSS follows them).

Usage:

    python benchmarks/bench_grpo_step.py --preset tiny --threads 1                  # CPU, tiny model (~20 s)
    python benchmarks/bench_grpo_step.py --preset qwen2.5-0.5b --device cuda \\
        --out benchmarks/results/grpo_step_gpu.md                                  # GPU, Qwen2.5-0.5B shapes

`main(argv)` returns the result as a dict (the test calls it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1engine.algo.advantages import group_advantages
from r1engine.algo.loss import grpo_loss_reference, token_logprobs
from r1engine.models import PolicyConfig, PolicyModel
from r1engine.ops import grpo_loss, linear_grpo_loss
from r1engine.packing import uncollate
from r1engine.rollout import create_engine
from r1engine.trainer.config import GRPOConfig
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.sequences import (
    SequenceBatch,
    build_sequences,
    completion_token_mask,
    loss_tokens,
    pack,
    packed_forward,
    packed_logprobs,
    packed_mtp_loss,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, cpu_name, peak_memory, write_report  # noqa: E402
from benchmarks.common import precise_cpu_rss as _precise_cpu_rss  # noqa: E402

PATHS = ("packed+fused", "packed+fused-linear", "padded+eager")
BASELINE = "padded+eager"
PAD_ID = 0

# Model shapes. Qwen2.5-0.5B: config.json of Qwen/Qwen2.5-0.5B (tied embeddings, rope theta 1e6), plus one MTP layer.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        num_mtp_layers=1,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        num_mtp_layers=1,
    ),
}


@dataclass
class Workload:
    """What one GRPO step processes (see the module docstring for the length distribution)."""

    prompts: int
    group_size: int
    prompt_min: int
    prompt_max: int
    max_new_tokens: int
    median_new_tokens: int
    length_sigma: float
    mini_batches: int

    def __post_init__(self) -> None:
        for name in ("prompts", "group_size", "prompt_min", "max_new_tokens", "median_new_tokens", "mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prompt_max < self.prompt_min:
            raise ValueError(f"--prompt-max ({self.prompt_max}) must be >= --prompt-min ({self.prompt_min})")
        if self.median_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"--median-new-tokens ({self.median_new_tokens}) must be <= --max-new-tokens ({self.max_new_tokens})"
            )
        if self.length_sigma < 0:
            raise ValueError(f"--length-sigma must be >= 0, got {self.length_sigma}")
        if self.num_sequences % self.mini_batches:
            raise ValueError(
                f"--mini-batches ({self.mini_batches}) must divide prompts x group size ({self.num_sequences})"
            )

    @property
    def num_sequences(self) -> int:
        return self.prompts * self.group_size

    @property
    def longest(self) -> int:
        return self.prompt_max + self.max_new_tokens


WORKLOAD_PRESETS: dict[str, Workload] = {
    # 64 completions (the paper's G = 16), 8 optimizer steps of 8 sequences. Estimated for the padded baseline's
    # mini-batch (8 x ~600 positions; logits, their fp32 copy, log-softmax and gradients at every position, plus
    # ~2 MB of saved activations per position): ~35 GB above ~11 GB resident, so it fits an 80 GB H100 with room.
    "qwen2.5-0.5b": Workload(4, 16, 32, 128, 512, 128, 0.8, 8),
    "tiny": Workload(2, 8, 8, 24, 64, 16, 0.8, 2),
}


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------------------------
# the workload


def random_prompts(wl: Workload, vocab_size: int, gen: torch.Generator) -> list[list[int]]:
    """`wl.prompts` prompts of random ids (special ids 0-2 excluded), lengths uniform in [prompt_min, prompt_max]."""
    lengths = torch.randint(wl.prompt_min, wl.prompt_max + 1, (wl.prompts,), generator=gen).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def completion_lengths(wl: Workload, gen: torch.Generator) -> list[int]:
    """Long-tailed completion lengths: log-normal around `median_new_tokens`, the longest one at the cap."""
    z = torch.randn(wl.num_sequences, generator=gen, dtype=torch.float64)
    lengths = (wl.median_new_tokens * torch.exp(wl.length_sigma * z)).round().clamp(1, wl.max_new_tokens).long()
    lengths[int(lengths.argmax())] = wl.max_new_tokens
    return lengths.tolist()


@dataclass
class Rollout:
    """One rollout: the sequences (prompt + completion) and one advantage per sequence."""

    seqs: SequenceBatch
    advantages: torch.Tensor  # float32 [N], CPU
    completion_lengths: list[int]
    decoded_tokens: int  # what the engine generated (every row to the cap)


def rollout(engine, wl: Workload, vocab_size: int, gen: torch.Generator, seed: int) -> Rollout:
    prompts = random_prompts(wl, vocab_size, gen)
    batch = engine.generate(prompts, n=wl.group_size, max_new_tokens=wl.max_new_tokens, temperature=1.0, seed=seed)
    lengths = completion_lengths(wl, gen)
    completions = [c[:n] for c, n in zip(batch.completion_ids, lengths, strict=True)]
    logprobs = [lp[:n] for lp, n in zip(batch.logprobs, lengths, strict=True)]
    prompt_of = [prompts[i] for i in batch.prompt_index.tolist()]
    seqs = build_sequences(prompt_of, completions, logprobs)
    rewards = torch.bernoulli(torch.full((wl.num_sequences,), 0.5), generator=gen)  # stand-in for accuracy rewards
    advantages = group_advantages(rewards.view(wl.prompts, wl.group_size), wl.group_size).reshape(-1).float()
    return Rollout(seqs, advantages, lengths, batch.stats.num_tokens)


def mini_batch_indices(wl: Workload, step: int, seed: int) -> list[list[int]]:
    """A random split of the rollout into `mini_batches` equal parts (as `GRPOTrainer.train_on_rollout`)."""
    order = torch.randperm(wl.num_sequences, generator=torch.Generator().manual_seed(seed * 7919 + step)).tolist()
    size = wl.num_sequences // wl.mini_batches
    return [order[i : i + size] for i in range(0, wl.num_sequences, size)]


def _to_device(seqs: SequenceBatch, device: torch.device) -> SequenceBatch:
    return SequenceBatch(*([t.to(device) for t in getattr(seqs, f.name)] for f in dataclasses.fields(seqs)))


@dataclass
class StepStats:
    """What one optimizer step reports; compared across paths on the warm-up step's first mini-batch."""

    policy_loss: float
    mtp_loss: float
    grad_norm: float
    old_logprob_sum: float  # sum of the old log-probs over the mini-batch's loss tokens


# ---------------------------------------------------------------------------------------------------------------
# ours: packing + fused loss


@torch.no_grad()
def packed_old_logprobs(
    model: PolicyModel, seqs: SequenceBatch, chunk_len: int, temperature: float
) -> list[torch.Tensor]:
    """Old-policy log-probs as the trainer infers them (one packed pass, fused `token_logprobs`), returned
    per sequence and position-aligned (0 off the loss tokens) on the model's device."""
    batch, _ = pack(seqs, chunk_len, pad_id=PAD_ID)
    tokens = loss_tokens(batch)
    values = packed_logprobs(model, batch, tokens, temperature)
    full = torch.zeros(batch.input_ids.numel(), dtype=values.dtype)
    full[tokens.index] = values
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for seq, part in zip(batch.seq_ids.tolist(), uncollate(batch, full.view_as(batch.input_ids)), strict=True):
        out[seq] = part.to(model.device)
    return out


def packed_fused_step(
    model: PolicyModel,
    train_engine: TrainEngine,
    seqs: SequenceBatch,
    old: list[torch.Tensor],
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    chunk_len: int,
    *,
    linear: bool = False,
) -> StepStats:
    """One optimizer step on packed sequences with the fused loss: `r1engine.trainer.grpo.grpo_train_step`'s
    computation (pack, packed forward, loss at the loss tokens only, packed MTP loss, backward, step) without its
    entropy metric, with every tensor on the model's device. `linear=True` swaps in `linear_grpo_loss`."""
    device = model.device
    batch, _ = pack(_to_device(seqs, device), chunk_len, fields={"old": [t.to(device) for t in old]}, pad_id=PAD_ID)
    tokens = loss_tokens(batch)
    out = packed_forward(model, batch)
    hidden = out.hidden[tokens.index]
    old_tokens = batch.fields["old"].reshape(-1)[tokens.index]
    args = (tokens.targets, advantages.to(device)[tokens.seq_ids], torch.ones(len(tokens.index), device=device))
    kwargs = dict(
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip=cfg.dual_clip,
        temperature=cfg.temperature,
        agg=cfg.agg,
        max_len=cfg.max_new_tokens,
        segment_ids=tokens.segment_ids,
    )
    if linear:
        loss, _ = linear_grpo_loss(hidden, model.lm_head.weight, *args, old_tokens, None, **kwargs)
    else:
        loss, _ = grpo_loss(model.logits(hidden), *args, old_tokens, None, inplace_backward=True, **kwargs)
    mtp = packed_mtp_loss(model, batch, out, cfg.mtp_loss_coef)
    train_engine.backward(loss + mtp)
    grad_norm = train_engine.step()
    return StepStats(float(loss.detach()), float(mtp.detach()), grad_norm, float(old_tokens.sum()))


# ---------------------------------------------------------------------------------------------------------------
# baseline: padding + eager loss


def pad_right(seqs: SequenceBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, targets, loss_mask), each `[B, Lmax]`, right-padded to the longest sequence."""
    width = int(seqs.lengths.max())
    out = []
    for name, dtype in (("input_ids", torch.long), ("targets", torch.long), ("loss_mask", torch.float32)):
        padded = torch.full((len(seqs), width), PAD_ID if dtype == torch.long else 0, dtype=dtype)
        for i, t in enumerate(getattr(seqs, name)):
            padded[i, : len(t)] = t
        out.append(padded.to(device))
    return out[0], out[1], out[2]


@torch.no_grad()
def padded_old_logprobs(model: PolicyModel, seqs: SequenceBatch, temperature: float) -> torch.Tensor:
    """Old-policy log-probs `[B, Lmax]` (0 off the loss tokens): padded forward, logits at every position,
    fp32 log_softmax + gather."""
    ids, targets, mask = pad_right(seqs, model.device)
    logits = model(ids).logits
    return token_logprobs(logits, targets, temperature) * mask


def padded_eager_step(
    model: PolicyModel,
    train_engine: TrainEngine,
    seqs: SequenceBatch,
    old: torch.Tensor,
    advantages: torch.Tensor,
    cfg: GRPOConfig,
) -> StepStats:
    """The baseline optimizer step: `[B, Lmax]` forward, logits at every position, the eager reference loss, the
    MTP loss on the padded batch (same tokens as the packed one), backward, step."""
    ids, targets, mask = pad_right(seqs, model.device)
    out = model(ids)
    loss, _ = grpo_loss_reference(
        out.logits,
        targets,
        advantages.to(model.device),
        mask,
        old,
        None,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip=cfg.dual_clip,
        temperature=cfg.temperature,
        agg=cfg.agg,
        max_len=cfg.max_new_tokens,
    )
    if cfg.mtp_loss_coef > 0 and model.config.num_mtp_layers:
        completion = completion_token_mask(mask).view_as(mask)  # a row's last slot wraps to the next row: always 0
        mtp = model.mtp_loss(ids, out.last_hidden, loss_mask=completion, lam=cfg.mtp_loss_coef)
    else:
        mtp = torch.zeros((), device=model.device)
    train_engine.backward(loss + mtp)
    grad_norm = train_engine.step()
    return StepStats(float(loss.detach()), float(mtp.detach()), grad_norm, float(old.sum()))


# ---------------------------------------------------------------------------------------------------------------
# one path = a model of its own + its inference and training functions


@dataclass
class StepPath:
    """One contender: a model of its own, its optimizer, how it infers old log-probs and trains; its timings."""

    name: str
    model: PolicyModel
    train_engine: TrainEngine
    infer: Callable[[Rollout, list[list[int]]], list[Any]]  # -> per mini-batch old log-probs
    train: Callable[[SequenceBatch, Any, torch.Tensor], StepStats]
    oom: str | None = None
    times: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {"infer": [], "train": []})
    memory: dict[str, PeakMemory] = dataclasses.field(default_factory=dict)


def make_path(name: str, model: PolicyModel, cfg: GRPOConfig, chunk_len: int) -> StepPath:
    engine = TrainEngine(model, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    if name == BASELINE:

        def infer(ro: Rollout, mbs: list[list[int]]) -> list[Any]:
            return [padded_old_logprobs(model, ro.seqs.subset(mb), cfg.temperature) for mb in mbs]

        def train(seqs: SequenceBatch, old: Any, adv: torch.Tensor) -> StepStats:
            return padded_eager_step(model, engine, seqs, old, adv, cfg)

    else:
        linear = name == "packed+fused-linear"

        def infer(ro: Rollout, mbs: list[list[int]]) -> list[Any]:
            old = packed_old_logprobs(model, ro.seqs, chunk_len, cfg.temperature)  # the whole rollout, packed once
            return [[old[i] for i in mb] for mb in mbs]

        def train(seqs: SequenceBatch, old: Any, adv: torch.Tensor) -> StepStats:
            return packed_fused_step(model, engine, seqs, old, adv, cfg, chunk_len, linear=linear)

    return StepPath(name, model, engine, infer, train)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class PathRun:
    """One path's inference and training on one rollout."""

    first: StepStats  # the first mini-batch's step
    infer_s: float
    train_s: float
    infer_memory: PeakMemory
    train_memory: PeakMemory


def run_path(path: StepPath, ro: Rollout, mbs: list[list[int]], device: torch.device) -> PathRun | None:
    """Inference then training of one path on one rollout; None (and `path.oom` set) when it runs out of memory."""
    try:
        with peak_memory(device) as mem_infer:
            t0 = time.perf_counter()
            olds = path.infer(ro, mbs)
            _sync(device)
            t_infer = time.perf_counter() - t0
        path.model.train()
        with peak_memory(device) as mem_train:
            t0 = time.perf_counter()
            stats = [path.train(ro.seqs.subset(mb), old, ro.advantages[mb]) for mb, old in zip(mbs, olds, strict=True)]
            _sync(device)
            t_train = time.perf_counter() - t0
        path.model.eval()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        path.oom = str(err).splitlines()[0][:200]
        path.train_engine.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return PathRun(stats[0], t_infer, t_train, mem_infer, mem_train)


def _record(path: StepPath, run: PathRun) -> None:
    path.times["infer"].append(run.infer_s)
    path.times["train"].append(run.train_s)
    for key, mem in (("infer", run.infer_memory), ("train", run.train_memory)):
        kept = path.memory.get(key)
        if kept is None or (mem.extra or 0) > (kept.extra or 0):
            path.memory[key] = mem


# ---------------------------------------------------------------------------------------------------------------
# the run


def model_config(args: argparse.Namespace) -> PolicyConfig:
    shape = dict(MODEL_PRESETS[args.preset])
    if args.hidden is not None:
        head_dim = shape["hidden_size"] // shape["num_heads"]
        if args.hidden % head_dim:
            raise ValueError(f"--hidden must be a multiple of the preset's head_dim ({head_dim}), got {args.hidden}")
        heads = args.hidden // head_dim
        kv = math.gcd(heads, shape["num_kv_heads"])
        ratio = shape["intermediate_size"] / shape["hidden_size"]
        shape.update(hidden_size=args.hidden, num_heads=heads, num_kv_heads=kv)
        shape["intermediate_size"] = max(64, round(args.hidden * ratio / 64) * 64)
    for arg, key in (("layers", "num_layers"), ("vocab", "vocab_size"), ("intermediate", "intermediate_size")):
        if getattr(args, arg) is not None:
            shape[key] = getattr(args, arg)
    return PolicyConfig(**shape)


def workload(args: argparse.Namespace) -> Workload:
    base = WORKLOAD_PRESETS[args.preset]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Workload) if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **changes)


def _max_check_diff(checks: dict[str, StepStats]) -> float | None:
    """Largest difference of any `StepStats` field between a path and the first one, relative to
    max(1, |first|): the first mini-batch is on-policy, so its policy loss can be ~0 and a pure ratio meaningless."""
    if len(checks) < 2:
        return None
    first, *rest = (dataclasses.asdict(c) for c in checks.values())
    return max(abs(v - first[k]) / max(1.0, abs(first[k])) for other in rest for k, v in other.items())


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    mcfg, wl = model_config(args), workload(args)
    if wl.longest > mcfg.max_position_embeddings:
        mcfg = mcfg.replace(max_position_embeddings=wl.longest)
    chunk_len = args.chunk_len or wl.longest
    if chunk_len < wl.longest:
        raise ValueError(f"--chunk-len ({chunk_len}) must hold the longest prompt + completion ({wl.longest})")
    cfg = GRPOConfig(group_size=wl.group_size, max_new_tokens=wl.max_new_tokens, beta=0.0, mini_batches=wl.mini_batches)
    paths_wanted = args.paths.split(",")
    for name in paths_wanted:
        if name not in PATHS:
            raise ValueError(f"--paths: unknown path {name!r}; expected a comma-separated subset of {PATHS}")

    torch.manual_seed(args.seed)  # PolicyModel draws its random init from the global generator
    base = PolicyModel(mcfg)
    base = base.to(device=device, dtype=dtype).eval()
    engine = create_engine(
        "native", model=base, num_speculative_tokens=args.speculative_tokens, max_model_len=wl.longest
    )
    paths = [make_path(name, copy.deepcopy(base), cfg, chunk_len) for name in paths_wanted]
    num_params = base.num_parameters()
    del base
    print(
        f"model {args.preset}: {num_params / 1e6:.1f}M parameters, {dtype}, {_device_name(device)}; "
        f"{wl.prompts} prompts x G={wl.group_size}, completions <= {wl.max_new_tokens} tokens, "
        f"{wl.mini_batches} mini-batches, chunk_len {chunk_len}",
        flush=True,
    )

    paths_by_name = {p.name: p for p in paths}
    gen = torch.Generator().manual_seed(args.seed)
    rollout_times: list[float] = []
    checks: dict[str, StepStats] = {}
    tokens: dict[str, list[int]] = {"real": [], "completion": [], "decoded": [], "padded": [], "packed": []}
    lengths: list[int] = []
    for step in range(args.warmup + args.repeats):
        record = step >= args.warmup
        _sync(device)
        t0 = time.perf_counter()
        ro = rollout(engine, wl, mcfg.vocab_size, gen, seed=args.seed * 1_000_003 + step)
        _sync(device)
        t_rollout = time.perf_counter() - t0
        mbs = mini_batch_indices(wl, step, args.seed)
        shift = step % len(paths)  # rotate the order so that no path always runs first (allocator, caches)
        runs: dict[str, PathRun | None] = {}
        for path in paths[shift:] + paths[:shift]:
            if path.oom is None:
                runs[path.name] = run = run_path(path, ro, mbs, device)
                if run is not None and step == 0:
                    checks[path.name] = run.first
                if run is not None and record:
                    _record(path, run)
        if record:
            rollout_times.append(t_rollout)
            lens = ro.seqs.lengths
            tokens["real"].append(int(lens.sum()))
            tokens["completion"].append(sum(ro.completion_lengths))
            tokens["decoded"].append(ro.decoded_tokens)
            tokens["padded"].append(sum(len(mb) * int(lens[mb].max()) for mb in mbs))
            tokens["packed"].append(sum(pack(ro.seqs.subset(mb), chunk_len)[0].input_ids.numel() for mb in mbs))
            lengths += ro.completion_lengths
        summary = " | ".join(
            f"{name} " + (f"infer {r.infer_s:.2f}s train {r.train_s:.2f}s" if r else f"OOM ({paths_by_name[name].oom})")
            for name, r in runs.items()
        )
        print(f"step {step}{' (warm-up)' if not record else ''}: rollout {t_rollout:.2f}s | {summary}", flush=True)

    real = statistics.mean(tokens["real"])
    t_roll = _median(rollout_times)
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        t_infer, t_train = _median(path.times["infer"]), _median(path.times["train"])
        ok = path.oom is None and t_train is not None
        step_s = t_roll + t_infer + t_train if ok else None
        results[path.name] = {
            "oom": path.oom,
            "rollout_s": t_roll,
            "infer_s": t_infer if ok else None,
            "train_s": t_train if ok else None,
            "step_s": step_s,
            "train_tokens_per_s": real / t_train if ok else None,
            "step_tokens_per_s": real / step_s if ok else None,
            "peak_infer_bytes": path.memory["infer"].extra if ok else None,
            "peak_train_bytes": path.memory["train"].extra if ok else None,
            "peak_train_total_bytes": path.memory["train"].total if ok else None,
        }
    base_res = results.get(BASELINE)
    for res in results.values():
        for key in ("train_tokens_per_s", "step_tokens_per_s"):
            b = base_res[key] if base_res else None
            res[key.replace("tokens_per_s", "speedup")] = res[key] / b if res[key] and b else None

    lengths_sorted = sorted(lengths)
    return {
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "command": args.command,
        "model": {
            "preset": args.preset,
            "parameters": num_params,
            "dtype": str(dtype).removeprefix("torch."),
            **{k: getattr(mcfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")},
            **{k: getattr(mcfg, k) for k in ("intermediate_size", "num_mtp_layers", "tie_word_embeddings")},
        },
        "workload": {
            **dataclasses.asdict(wl),
            "chunk_len": chunk_len,
            "speculative_tokens": args.speculative_tokens,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "completion_len_mean": statistics.mean(lengths_sorted),
            "completion_len_median": statistics.median(lengths_sorted),
            "completion_len_p90": lengths_sorted[int(0.9 * (len(lengths_sorted) - 1))],
            "completion_len_max": lengths_sorted[-1],
            "real_tokens_per_step": real,
            "completion_tokens_per_step": statistics.mean(tokens["completion"]),
            "decoded_tokens_per_step": statistics.mean(tokens["decoded"]),
            "padded_tokens_per_step": statistics.mean(tokens["padded"]),
            "packed_tokens_per_step": statistics.mean(tokens["packed"]),
        },
        "rollout": {"s": t_roll, "decoded_tokens_per_s": statistics.mean(tokens["decoded"]) / t_roll},
        "paths": results,
        "check": {name: dataclasses.asdict(s) for name, s in checks.items()},
        "check_max_diff": _max_check_diff(checks),
    }


# ---------------------------------------------------------------------------------------------------------------
# reporting


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def markdown(result: dict[str, Any]) -> str:
    m, w, r = result["model"], result["workload"], result["rollout"]
    real, padded, packed = (w[f"{k}_tokens_per_step"] for k in ("real", "padded", "packed"))
    lines = [
        f"## {result['device']}, {m['preset']} shapes, {m['dtype']}",
        "",
        f"Date {result['date']}, commit `{result['commit']}`, torch {result['torch']}.",
        f"Command: `{result['command']}`",
        "",
        f"Model: {m['parameters'] / 1e6:.1f}M parameters (hidden {m['hidden_size']}, {m['num_layers']} layers, "
        f"{m['num_heads']} heads / {m['num_kv_heads']} KV heads, intermediate {m['intermediate_size']}, vocab "
        f"{m['vocab_size']}, tied embeddings {m['tie_word_embeddings']}, {m['num_mtp_layers']} MTP layer), random "
        "weights.",
        f"Step: {w['prompts']} prompts x G = {w['group_size']} completions; prompts "
        f"{w['prompt_min']}-{w['prompt_max']} tokens; completions log-normal (median {w['median_new_tokens']}, "
        f"sigma {w['length_sigma']}) capped at {w['max_new_tokens']}: measured mean {w['completion_len_mean']:.0f}, "
        f"median {w['completion_len_median']:.0f}, p90 {w['completion_len_p90']}, max {w['completion_len_max']}; "
        f"{w['mini_batches']} optimizer steps per rollout; packed chunk_len {w['chunk_len']}; "
        f"{w['speculative_tokens']} speculative tokens in the rollout. Median of {w['repeats']} steps after "
        f"{w['warmup']} warm-up.",
        f"Tokens per step: {real:.0f} real (prompt + completion; {w['completion_tokens_per_step']:.0f} completion); "
        f"the padded baseline computes {padded:.0f} positions ({100 * (1 - real / padded):.0f}% padding), the "
        f"packed paths {packed:.0f} ({100 * (1 - real / packed):.0f}% chunk-tail padding).",
        f"Rollout (shared by the paths): {r['s']:.2f} s, {r['decoded_tokens_per_s']:,.0f} decoded tokens/s.",
        "",
        "| path | train s | train tokens/s | vs baseline | infer s | step s | step tokens/s | vs baseline | "
        "peak train mem | peak infer mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in result["paths"].items():
        if p["oom"]:
            lines.append(f"| {name} | OOM | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {p['train_s']:.3f} | {p['train_tokens_per_s']:,.0f} | {_fmt(p['train_speedup'], '.2f')}x | "
            f"{p['infer_s']:.3f} | {p['step_s']:.3f} | {p['step_tokens_per_s']:,.0f} | "
            f"{_fmt(p['step_speedup'], '.2f')}x | {_mib(p['peak_train_bytes'])} | {_mib(p['peak_infer_bytes'])} |"
        )
    lines += [
        "",
        "Same-batch check (warm-up step, first mini-batch, identical weights):",
        "",
        "| path | policy loss | MTP loss | grad norm | sum of old log-probs |",
        "|---|---|---|---|---|",
    ]
    for name, c in result["check"].items():
        lines.append(
            f"| {name} | {c['policy_loss']:.6f} | {c['mtp_loss']:.6f} | {c['grad_norm']:.6f} | "
            f"{c['old_logprob_sum']:.3f} |"
        )
    if result["check_max_diff"] is not None:
        lines += ["", f"Largest difference between paths, relative to max(1, |value|): {result['check_max_diff']:.1e}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="tiny", help="model shape and workload sizes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--hidden", type=int, help="override the preset's hidden size (heads keep their width)")
    p.add_argument("--intermediate", type=int, help="override the MLP width (default: scaled with --hidden)")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    for f in dataclasses.fields(Workload):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type={"int": int, "float": float}[f.type],
            help="override the preset",
        )
    p.add_argument("--chunk-len", type=int, help="packed chunk length (default: longest prompt + completion)")
    p.add_argument("--speculative-tokens", type=int, default=0, help="MTP draft tokens in the rollout (random "
                   "weights accept few drafts, so 0 by default)")  # fmt: skip
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as markdown here")
    p.add_argument("--json", type=Path, help="write the raw result as JSON here")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the same-batch check runs on the warm-up step), got {args.warmup}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    args.command = "python benchmarks/bench_grpo_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None, *, precise_cpu_rss: bool = False) -> dict[str, Any]:
    """Run the benchmark (arguments as on the command line), print and optionally write the results."""
    args = parse_args(argv)
    if precise_cpu_rss and args.device == "cpu":
        _precise_cpu_rss()
    result = run(args)
    write_report(markdown(result), result, args.out, args.json)
    return result


if __name__ == "__main__":
    main(precise_cpu_rss=True)
