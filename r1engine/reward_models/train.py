"""Training the reward models: a pairwise preference model (Bradley-Terry) and a pointwise safe/unsafe classifier.

Losses (one number per pair or response; a batch's loss is their weighted mean):

    pairwise    -log sigmoid(pref(chosen, rejected))
    pointwise   binary cross-entropy of the log-odds of "safe" against the label (1: safe)

pref is what the helpfulness reward reads (`r1engine.reward_models.scoring`): for a single-input model the score
difference s(chosen) - s(rejected), the Bradley-Terry model itself; for a pair-input model the swap-averaged verdict
(f(chosen first, rejected second) - f(rejected first, chosen second)) / 2, the same Bradley-Terry loss on the
preference the reward uses, so the reward's sigmoid(pref) is the trained win probability and a bias towards the
first position never enters the loss. The pairwise model sees only the final summaries (`data.summary_only`), as
the helpfulness reward shows them; the classifier sees whole responses, reasoning included.

A batch of `training.batch_size` pairs or responses is one optimizer step; its inputs are packed best-fit into
micro-batches of at most `training.micro_batch_tokens` tokens (the two inputs of a pair together), each one packed
varlen forward + backward, the gradients accumulated (the same step as one pass over the batch). Rows with an input
longer than `training.max_length` tokens are left out and counted. Preference pairs are length-balanced
(`r1engine.reward_models.data.length_balance`). Held-out pairwise accuracy (or classifier accuracy) is evaluated
every `training.eval_every` steps and at the end, beside the accuracy of "the longer response wins" on the same
pairs. Writes `<output_dir>/model/` (a Hugging Face `*ForSequenceClassification` directory with the tokenizer),
`metrics.jsonl` and `summary.json`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from r1engine.packing import plan
from r1engine.reward_models.config import ConfigError, RMConfig
from r1engine.reward_models.data import length_balance, read_labels, read_preferences
from r1engine.reward_models.format import RewardFormat
from r1engine.reward_models.inference import score_sequences
from r1engine.reward_models.model import RewardModel
from r1engine.reward_models.text import Renderer, final_summary

__all__ = [
    "Example",
    "RewardModelTrainer",
    "bradley_terry_loss",
    "build_reward_model",
    "encode_examples",
    "train_reward_model",
    "train_step",
]


@dataclass
class Example:
    """One training unit: the inputs of a pair (chosen side first) or of one labelled response."""

    seqs: list[list[int]]
    target: float  # pointwise: 1.0 safe, 0.0 unsafe; pairwise: unused
    weight: float = 1.0
    chosen_len: int = 0  # pairwise: tokens of the responses (what length balancing and the length baseline read)
    rejected_len: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def bradley_terry_loss(pref: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(pref) per pair (pref: the preference of chosen over rejected)."""
    return F.softplus(-pref)


def preferences(outputs: torch.Tensor, input_kind: str) -> torch.Tensor:
    """pref(chosen, rejected) `[n]` from the head outputs `[2n, 1]` of n pairs' inputs, laid out (chosen side,
    rejected side) per pair."""
    s = outputs[:, 0].reshape(-1, 2)
    diff = s[:, 0] - s[:, 1]
    return diff / 2 if input_kind == "pair" else diff


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_reward_model(cfg: RMConfig) -> tuple[RewardModel, Any]:
    """The model to train and its tokenizer, as `cfg.model` says (see `RMModelConfig.path`)."""
    from r1engine.models.checkpoint import resolve_model_dir
    from r1engine.models.config import PolicyConfig
    from r1engine.models.source import check_tokenizer_fits
    from r1engine.models.tokenizer import build_char_tokenizer, load_tokenizer

    fmt = RewardFormat(kind=cfg.kind, input=cfg.input_kind, template=cfg.model.template)
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.path is None:
        tokenizer = build_char_tokenizer()
        preset = PolicyConfig.tiny if cfg.model.preset == "tiny" else PolicyConfig.demo
        torch.manual_seed(cfg.seed)
        model = RewardModel(preset(vocab_size=128, num_mtp_layers=0, max_position_embeddings=8192), 1, fmt)
        model.body.reset_parameters(cfg.seed)
        model.reset_head(cfg.seed + 1)
        return model.to(dtype=dtype), tokenizer
    root = resolve_model_dir(cfg.model.path, key="model.path")
    model = RewardModel.from_pretrained(root, fmt=fmt, dtype=dtype, seed=cfg.seed, key="model.path")
    if cfg.model.num_layers is not None:
        try:
            model.keep_layers(cfg.model.num_layers)
        except ValueError as exc:
            raise ConfigError(f"model.{exc}") from None
    tok_key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.path"
    tokenizer = load_tokenizer(cfg.model.tokenizer if cfg.model.tokenizer is not None else root, key=tok_key)
    check_tokenizer_fits(tokenizer, model.config, tok_key)
    return model, tokenizer


def encode_examples(rows: list, cfg: RMConfig, renderer: Renderer) -> tuple[list[Example], int]:
    """Training units of the rows (`PreferencePair`s or `LabeledResponse`s) and how many were left out for an input
    longer than `training.max_length`."""
    limit = cfg.training.max_length
    examples, overlong = [], 0
    for row in rows:
        if cfg.kind == "pointwise":
            ex = Example([renderer.single(row.prompt, row.response)], 1.0 if row.safe else 0.0)
        else:
            view = final_summary if cfg.data.summary_only else (lambda s: s)
            c, r = view(row.chosen), view(row.rejected)
            if cfg.input_kind == "pair":
                seqs = [renderer.pair(row.prompt, c, r), renderer.pair(row.prompt, r, c)]
            else:
                seqs = [renderer.single(row.prompt, c), renderer.single(row.prompt, r)]
            tok = renderer.tokenizer
            ex = Example(seqs, 0.0, chosen_len=max(1, len(tok.encode(c, add_special_tokens=False))),
                         rejected_len=max(1, len(tok.encode(r, add_special_tokens=False))))  # fmt: skip
        if max(len(s) for s in ex.seqs) > limit:
            overlong += 1
            continue
        examples.append(ex)
    return examples, overlong


def _unit_losses(model: RewardModel, units: list[Example], kind: str, input_kind: str, device) -> torch.Tensor:
    """Per-unit losses `[m]` of one packed forward over the units' inputs."""
    seqs = [torch.tensor(s, dtype=torch.int64) for u in units for s in u.seqs]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    out = model(torch.cat(seqs).to(device), cu.to(device), max_seqlen=int(lengths.max()))
    return _losses(model, out, units, kind, input_kind)


def _losses(model: RewardModel, out: torch.Tensor, units: list[Example], kind: str, input_kind: str) -> torch.Tensor:
    if kind == "pairwise":
        return bradley_terry_loss(preferences(out, input_kind))
    target = torch.tensor([u.target for u in units], device=out.device)
    return F.binary_cross_entropy_with_logits(model.safe_logit(out), target, reduction="none")


@torch.no_grad()
def evaluate(model: RewardModel, examples: list[Example], cfg: RMConfig, token_budget: int) -> dict[str, float]:
    """Held-out loss and accuracy (pairwise: pref > 0, a tie counting half; pointwise: P(safe) > 0.5 matches the
    label), and for pairs the accuracy of "the longer response wins" on the same pairs."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    out = score_sequences(model, [s for e in examples for s in e.seqs], token_budget=token_budget)
    model.train(was_training)
    if cfg.kind == "pairwise":
        pref = preferences(out, cfg.input_kind)
        lc = torch.tensor([e.chosen_len for e in examples])
        lr = torch.tensor([e.rejected_len for e in examples])
        return {
            "eval/loss": float(bradley_terry_loss(pref).mean()),
            "eval/pairwise_acc": float(((pref > 0).float() + 0.5 * (pref == 0).float()).mean()),
            "eval/longer_wins_acc": float(((lc > lr).float() + 0.5 * (lc == lr).float()).mean()),
            "eval/pref_mean": float(pref.mean()),
        }
    logit = model.safe_logit(out)
    target = torch.tensor([e.target for e in examples])
    return {
        "eval/loss": float(F.binary_cross_entropy_with_logits(logit, target)),
        "eval/classifier_acc": float(((logit > 0).float() == target).float().mean()),
        "eval/safe_frac": float(target.mean()),
    }


def _split(rows: list, eval_size: int) -> tuple[list, list]:
    from r1engine.data.dataset import EVAL_SPLIT_SEED, DataError

    if eval_size >= len(rows):
        raise DataError(
            f"data.eval_size: {eval_size} held-out rows would leave nothing to train on ({len(rows)} rows in "
            "data.train_files); lower it or give data.eval_files"
        )
    order = list(range(len(rows)))
    random.Random(EVAL_SPLIT_SEED).shuffle(order)
    held = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read(cfg: RMConfig, files: list, key: str) -> list:
    d = cfg.data
    if cfg.kind == "pairwise":
        return read_preferences(files, key=key, prompt_key=d.prompt_key, chosen_key=d.chosen_key,
                                rejected_key=d.rejected_key)  # fmt: skip
    return read_labels(files, key=key, prompt_key=d.prompt_key, response_key=d.response_key, label_key=d.label_key)


class RewardModelTrainer:
    """One reward-model training run (see the module docstring). The constructor loads the model, the tokenizer and
    the data, so that every error of the configuration, the model or the data (naming the key, the file and the row)
    comes before any training; `run()` trains, evaluates and writes the checkpoint. `model` and `tokenizer` replace
    `cfg.model` (a caller's own)."""

    def __init__(
        self,
        cfg: RMConfig,
        *,
        progress: bool = True,
        model: RewardModel | None = None,
        tokenizer: Any = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from r1engine.data.dataset import DataError

        t = cfg.training
        self.cfg, self.progress = cfg, progress
        self.out_dir = Path(cfg.output_dir)
        self.model_dir = self.out_dir / "model"
        if (self.model_dir / "config.json").exists():
            raise ConfigError(
                f"output_dir: {str(self.out_dir)!r} already holds a trained reward model ({self.model_dir}); choose "
                "another output_dir or move it away (nothing is overwritten)"
            )
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tokenizer = build_reward_model(cfg)
        elif tokenizer is None:
            raise ValueError("tokenizer: a caller's model needs its tokenizer")
        model.fmt.check_labels(model.num_labels)
        if model.fmt.kind != cfg.kind:
            raise ValueError(f"kind: the model is a {model.fmt.kind} reward model, the config trains a {cfg.kind} one")
        self.model, self.tokenizer = model, tokenizer
        self.device = _device(t.device)
        renderer = Renderer(tokenizer, model.fmt.template)

        train_rows = _read(cfg, cfg.data.train_files, "data.train_files")
        if cfg.data.eval_files:
            eval_rows = _read(cfg, cfg.data.eval_files, "data.eval_files")
        else:
            train_rows, eval_rows = _split(train_rows, cfg.data.eval_size)
        train, overlong = encode_examples(train_rows, cfg, renderer)
        self.held, eval_overlong = encode_examples(eval_rows, cfg, renderer)
        self.stats: dict[str, float] = {"data/train_rows": len(train_rows), "data/eval_rows": len(eval_rows),
                                        "data/overlong_left_out": overlong,
                                        "data/eval_overlong_left_out": eval_overlong}  # fmt: skip
        if cfg.kind == "pairwise" and train:
            weights, balance = length_balance(
                [e.chosen_len for e in train], [e.rejected_len for e in train], cfg.data.length_balance, cfg.seed
            )
            for e, w in zip(train, weights.tolist(), strict=True):
                e.weight = w
            self.stats.update(balance)
            train = [e for e in train if e.weight > 0]
        if not train:
            raise DataError(
                f"data.train_files: no training rows left ({overlong} longer than training.max_length={t.max_length}"
                f"{', the others left out by data.length_balance' if cfg.kind == 'pairwise' else ''})"
            )
        self.train = train
        self.say = log or (lambda s: tqdm.write(f"[r1engine] {s}") if progress else None)

    def run(self) -> dict[str, Any]:
        """Train, evaluate and save; returns the run's summary (also written to `summary.json`)."""
        from r1engine.optim import FusedAdamW

        cfg, t, model, train, held = self.cfg, self.cfg.training, self.model, self.train, self.held
        model.to(self.device).train()
        rng = random.Random(cfg.seed)
        order = [i for _ in range(t.epochs) for i in rng.sample(range(len(train)), len(train))]
        steps = math.ceil(len(order) / t.batch_size)
        optimizer = FusedAdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        what = "pairs" if cfg.kind == "pairwise" else "responses"
        self.say(f"reward model ({cfg.kind}, {cfg.input_kind} input): {len(train)} training and {len(held)} held-out "
                 f"{what}, {steps} steps")  # fmt: skip
        budget = t.micro_batch_tokens
        record: dict[str, Any] = {"step": 0, **self.stats, **evaluate(model, held, cfg, budget)}
        first_eval = {k: v for k, v in record.items() if k.startswith("eval/")}
        t_start = time.perf_counter()
        bar = tqdm(range(steps), desc=f"train-rm {cfg.kind}", disable=not self.progress, dynamic_ncols=True)
        with (self.out_dir / "metrics.jsonl").open("w") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            for step in bar:
                units = [train[i] for i in order[step * t.batch_size : (step + 1) * t.batch_size]]
                lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
                record = {"step": step + 1, **train_step(model, optimizer, units, cfg, lr, self.device)}
                if (t.eval_every and (step + 1) % t.eval_every == 0) or step + 1 == steps:
                    record.update(evaluate(model, held, cfg, budget))
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/acc']:.2f}")
        final = {k: v for k, v in record.items() if k.startswith("eval/")}
        model.eval().to("cpu").save_pretrained(self.model_dir, self.tokenizer)
        summary = {
            "model_dir": str(self.model_dir),
            "kind": cfg.kind,
            "input": cfg.input_kind,
            "steps": steps,
            "train_examples": len(train),
            "eval_examples": len(held),
            "train_time_s": time.perf_counter() - t_start,
            **self.stats,
            **{f"initial_{k.removeprefix('eval/')}": v for k, v in first_eval.items()},
            **{k.removeprefix("eval/"): v for k, v in final.items()},
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = "pairwise_acc" if cfg.kind == "pairwise" else "classifier_acc"
        line = f"held-out {acc.replace('_', ' ')} {summary.get('initial_' + acc, math.nan):.3f} -> "
        line += f"{summary.get(acc, math.nan):.3f}"
        if cfg.kind == "pairwise":
            line += f" (the longer response wins: {summary.get('longer_wins_acc', math.nan):.3f})"
        self.say(line)
        return summary


def train_step(model: RewardModel, optimizer, units: list[Example], cfg: RMConfig, lr: float, device) -> dict[str, Any]:
    """One optimizer step on a batch of units: packed micro-batches of at most `training.micro_batch_tokens` tokens,
    gradients accumulated (each micro-batch's weighted loss divided by the whole batch's weight), clipped, applied."""
    t0 = time.perf_counter()
    t = cfg.training
    total_weight = sum(u.weight for u in units)
    lengths = torch.tensor([u.tokens for u in units], dtype=torch.int64)
    packing = plan(lengths, max(t.micro_batch_tokens, int(lengths.max())))
    loss_sum, correct = 0.0, 0.0
    for c in range(packing.num_chunks):
        index = packing.chunk(c).seq_indices
        if not index:
            continue
        micro = [units[i] for i in index]
        losses = _unit_losses(model, micro, cfg.kind, cfg.input_kind, device)
        w = torch.tensor([u.weight for u in micro], device=losses.device)
        ((losses * w).sum() / total_weight).backward()
        loss_sum += float((losses.detach() * w).sum())
        # right: pref > 0 for a pair, P(label) > 0.5 for a response; both are a loss below log 2
        correct += float(((losses.detach() < math.log(2)).float() * w).sum())
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = optimizer.clip_grad_norm_(t.max_grad_norm) if math.isfinite(t.max_grad_norm) else None
    optimizer.step()
    optimizer.zero_grad()
    return {
        "train/loss": loss_sum / total_weight,
        "train/acc": correct / total_weight,
        "train/lr": lr,
        "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
        "train/tokens": int(lengths.sum()),
        "train/micro_batches": packing.num_chunks,
        "time/step_s": time.perf_counter() - t0,
    }


def train_reward_model(
    cfg: RMConfig,
    *,
    progress: bool = True,
    model: RewardModel | None = None,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`RewardModelTrainer(cfg, ...).run()`: train a reward model as `cfg` says; returns the run's summary."""
    return RewardModelTrainer(cfg, progress=progress, model=model, tokenizer=tokenizer, log=log).run()
