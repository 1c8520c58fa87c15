"""Reward models in the inference module: text in, scores out, batched over packed sequences, on the model's own
device or offloaded between stages, asynchronously beside the trainer.

`score_sequences` is the batched forward: token sequences are packed best-fit (`r1engine.packing.plan`) into chunks of
at most `token_budget` tokens, each chunk one packed varlen forward (no padding computed, attention inside each
sequence). `mode="padded"` runs the same sequences as right-padded `[B, T]` batches instead (B * T within the budget,
in input order; "padded_sorted": sorted by length first), the baseline that the packed path is measured against
(benchmarks/bench_reward_models.py). The scores are the same either way.

`RewardScorer` holds a `RewardModel` and its tokenizer: it renders text (`r1engine.reward_models.text`), scores it,
moves the model to its device only while scoring when `offload=True` (as the rollout engine sleeps between stages),
and `submit` runs any scoring call on its own thread and returns a `concurrent.futures.Future`, so that scoring
overlaps rule rewards (worker processes) and log-prob inference as the asynchronous rule rewards do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from r1engine.packing import plan
from r1engine.reward_models.format import RewardFormat
from r1engine.reward_models.model import RewardModel
from r1engine.reward_models.text import Renderer

__all__ = ["MODES", "RewardScorer", "score_sequences"]

log = logging.getLogger(__name__)

MODES = ("packed", "padded", "padded_sorted")


def _as_tensors(seqs: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(seqs):
        t = s if isinstance(s, torch.Tensor) else torch.tensor(list(s), dtype=torch.int64)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"seqs[{i}]: expected a non-empty 1-D sequence of token ids, got shape {tuple(t.shape)}")
        out.append(t.to(torch.int64))
    return out


@torch.no_grad()
def score_sequences(
    model: RewardModel,
    seqs: Sequence[Sequence[int] | torch.Tensor],
    *,
    token_budget: int = 16384,
    mode: str = "packed",
    pad_id: int = 0,
) -> torch.Tensor:
    """Head outputs `[n, num_labels]` (float32, CPU) of `seqs` (token-id sequences), read at each one's last token.

    `token_budget`: tokens per forward (a longer sequence runs alone). `mode`: see the module docstring.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    if token_budget < 1:
        raise ValueError(f"token_budget: must be >= 1, got {token_budget}")
    tensors = _as_tensors(seqs)
    out = torch.empty(len(tensors), model.num_labels, dtype=torch.float32)
    if not tensors:
        return out
    device = model.device
    lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
    if mode == "packed":
        packing = plan(lengths, max(token_budget, int(lengths.max())))
        for c in range(packing.num_chunks):
            index = packing.chunk(c).seq_indices
            if not index:
                continue
            cu = torch.zeros(len(index) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lengths[index], 0)
            ids = torch.cat([tensors[i] for i in index]).to(device)
            out[index] = model(ids, cu.to(device), max_seqlen=int(lengths[index].max())).cpu()
        return out
    order = (
        sorted(range(len(tensors)), key=lambda i: -int(lengths[i])) if mode == "padded_sorted" else range(len(tensors))
    )
    batch: list[int] = []

    def run(rows: list[int]) -> None:
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        for r, i in enumerate(rows):
            ids[r, : lengths[i]] = tensors[i]
        out[rows] = model(ids.to(device), lengths=lengths[rows].to(device)).cpu()

    for i in order:
        width = max([int(lengths[j]) for j in batch] + [int(lengths[i])])
        if batch and (len(batch) + 1) * width > token_budget:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    return out


class SerialThread:
    """A model's own thread: `submit(fn, ...)` runs calls one at a time, in submission order, and returns their
    Futures; `close()` (or leaving a `with` block) waits for them and stops the thread. Subclasses name the thread
    (`thread_prefix`) and have a `name`."""

    thread_prefix = "model"
    name = ""
    _executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run `fn(*args, **kwargs)` on the thread; returns its Future."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.thread_prefix}-{self.name}")
        return self._executor.submit(fn, *args, **kwargs)

    def close(self) -> None:
        """Wait for submitted calls and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RewardScorer(SerialThread):
    """A reward model with its tokenizer, scoring text (see the module docstring).

    `device`: where the model scores (None: where it is). `offload`: keep the weights on the CPU between calls and
    move them to `device` only while scoring. `token_budget`: tokens per packed forward. `max_length`: inputs longer
    than this keep their last `max_length` tokens (the score is read at the end; None: the model's
    max_position_embeddings). `mode`: "packed" or a padded baseline (`score_sequences`). `name`: for messages.
    """

    thread_prefix = "rm"

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        offload: bool = False,
        token_budget: int = 16384,
        max_length: int | None = None,
        mode: str = "packed",
        name: str = "reward_model",
    ) -> None:
        from r1engine.models.source import check_tokenizer_fits

        if not isinstance(model, RewardModel):
            raise TypeError(f"model: expected a RewardModel, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        check_tokenizer_fits(tokenizer, model.config, name)  # the model's own tokenizer, or refuse
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, model.fmt.template)
        self.device = torch.device(device) if device is not None else model.device
        self.offload = bool(offload) and self.device.type != "cpu"
        self.token_budget = int(token_budget)
        limit = model.config.max_position_embeddings
        self.max_length = min(int(max_length), limit) if max_length is not None else limit
        self.mode = mode
        self.name = name
        self.truncated = 0
        """Inputs cut to `max_length` so far."""
        self._lock = threading.Lock()
        self.model.to("cpu" if self.offload else self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        fmt: RewardFormat | None = None,
        dtype: torch.dtype = torch.float32,
        key: str = "path",
        **options: Any,
    ) -> RewardScorer:
        """The reward model of a directory (`RewardModel.from_pretrained`) with its tokenizer (from the directory,
        or `tokenizer`); `options` as for the constructor. Errors name `key` (or `key` + ".tokenizer")."""
        from r1engine.models.checkpoint import resolve_model_dir
        from r1engine.models.source import check_tokenizer_fits
        from r1engine.models.tokenizer import load_tokenizer

        model = RewardModel.from_pretrained(path, fmt=fmt, dtype=dtype, key=key)
        tok_key = f"{key}.tokenizer" if tokenizer is not None else key
        tok = load_tokenizer(tokenizer if tokenizer is not None else resolve_model_dir(path, key=key), key=tok_key)
        check_tokenizer_fits(tok, model.config, tok_key)  # a ValueError naming the key
        return cls(model, tok, name=options.pop("name", key), **options)

    @property
    def fmt(self) -> RewardFormat:
        return self.model.fmt

    # -------------------------------------------------------------------------------------------- inputs
    def _fit(self, ids: list[int]) -> list[int]:
        """The model's rule for where a row ends (transformers' last non-pad token: trailing pads dropped), and the
        length limit (the beginning cut off)."""
        pad = self.model.pad_token_id
        if pad is not None:
            while len(ids) > 1 and ids[-1] == pad:
                ids = ids[:-1]
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[-self.max_length :]
        return ids

    def encode_single(self, prompt: Any, response: str) -> list[int]:
        return self._fit(self.renderer.single(prompt, response))

    def encode_pair(self, prompt: Any, a: str, b: str) -> list[int]:
        return self._fit(self.renderer.pair(prompt, a, b))

    # -------------------------------------------------------------------------------------------- scoring
    @contextlib.contextmanager
    def awake(self) -> Iterator[RewardModel]:
        """The model on its device for the block (moved back to the CPU after it when offloading)."""
        with self._lock:
            if self.offload:
                self.model.to(self.device)
            try:
                yield self.model
            finally:
                if self.offload:
                    self.model.to("cpu")
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()

    def score_ids(self, seqs: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """Head outputs `[n, num_labels]` (float32, CPU) of token sequences already in the model's vocabulary."""
        pad = self.model.pad_token_id
        with self.awake() as model:
            return score_sequences(
                model, seqs, token_budget=self.token_budget, mode=self.mode, pad_id=pad if pad is not None else 0
            )

    def single_logits(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        """Outputs `[n, num_labels]` for prompt i with response i (single inputs)."""
        _check_same_length(prompts=prompts, responses=responses)
        return self.score_ids([self.encode_single(p, r) for p, r in zip(prompts, responses, strict=True)])

    def pair_logits(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """The pair-input model's preference `[n]` for `firsts[i]` shown as response A against `seconds[i]`."""
        if self.fmt.input != "pair":
            raise ValueError(f"{self.name}: a single-input reward model has no pair inputs (input='single')")
        _check_same_length(prompts=prompts, firsts=firsts, seconds=seconds)
        seqs = [self.encode_pair(p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        return self.score_ids(seqs)[:, 0]


def _check_same_length(**columns: Sequence[Any]) -> None:
    sizes = {name: len(col) for name, col in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"expected one entry per row in each of {', '.join(sizes)}, got {sizes}")
