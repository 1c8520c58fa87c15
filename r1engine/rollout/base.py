"""What every rollout backend returns and accepts: `RolloutBatch`, `RolloutStats`, the `RolloutEngine` protocol
and the shared input checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from r1engine.models.policy import PolicyModel


@dataclass
class RolloutStats:
    """Counters of one `generate` call. acceptance_rate = accepted / drafted (nan when nothing was drafted)."""

    backend: str
    num_completions: int = 0
    num_tokens: int = 0
    elapsed_s: float = 0.0
    num_speculative_tokens: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else float("nan")

    @classmethod
    def combined(cls, parts: Sequence[RolloutStats], *, concurrent: bool = False) -> RolloutStats:
        """The counters of several calls as one call's: completions, tokens and drafts add up; times and steps add
        up for calls made one after the other, and are the longest call's for calls that ran at once (workers)."""
        if not parts:
            raise ValueError("RolloutStats.combined: no parts")
        longest = max if concurrent else sum
        return cls(
            backend=parts[0].backend,
            num_speculative_tokens=parts[0].num_speculative_tokens,
            num_completions=sum(s.num_completions for s in parts),
            num_tokens=sum(s.num_tokens for s in parts),
            num_drafted=sum(s.num_drafted for s in parts),
            num_accepted=sum(s.num_accepted for s in parts),
            elapsed_s=longest(s.elapsed_s for s in parts),
            num_steps=longest(s.num_steps for s in parts),
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "backend": self.backend,
            "num_completions": self.num_completions,
            "num_tokens": self.num_tokens,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
            "num_speculative_tokens": self.num_speculative_tokens,
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "acceptance_rate": self.acceptance_rate,
        }


@dataclass
class RolloutBatch:
    """Completions of one `generate` call, ordered prompt-major (prompt 0's n samples, then prompt 1's, ...).

    `prompt_index[i]`: which prompt completion i answers. `completion_ids[i]`: sampled ids (stop token included
    when one ended it). `finish_reason[i]`: "stop" or "length". `logprobs[i]`: fp32 log-prob of each sampled token
    under the distribution it was sampled from, softmax(logits / T) after top-k / top-p (vLLM's
    "processed_logprobs"), speculative or not; greedy calls report log softmax(raw logits). The trainer's policy at
    `grpo.temperature` T is this distribution when there is no top-k / top-p. `versions[i]`: int64, aligned with
    `logprobs[i]`, the policy version (`RolloutEngine.version`) whose weights sampled each token, per token: a
    completion resumed after a weight sync (a partial rollout, `r1engine.rollout.partial`) mixes two; empty when the
    producer did not record versions (a batch merged by older code). `prompt_ids[i]`: completion i's prompt (each
    prompt repeated for its n completions).
    """

    prompt_index: torch.Tensor
    completion_ids: list[list[int]]
    logprobs: list[torch.Tensor]
    finish_reason: list[str]
    stats: RolloutStats
    prompt_ids: list[list[int]] = field(default_factory=list)
    versions: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def padded(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids `[N, L]` padded with pad_id, logprobs `[N, L]` padded with 0, mask `[N, L]` bool)."""
        n = len(self.completion_ids)
        width = max((len(c) for c in self.completion_ids), default=0)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        lp = torch.zeros((n, width), dtype=torch.float32)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, (c, lps) in enumerate(zip(self.completion_ids, self.logprobs, strict=True)):
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            lp[i, : len(c)] = lps
            mask[i, : len(c)] = True
        return ids, lp, mask


def concat_batches(batches: Sequence[RolloutBatch], *, concurrent: bool) -> RolloutBatch:
    """The batches of consecutive prompt shards as the one batch of all their prompts, in order (each shard's
    prompt indices shifted past the previous shards'). `concurrent`: the shards were generated at once (on several
    workers), so the call took as long as the longest; else one after the other."""
    if not batches:
        raise ValueError("concat_batches: no batches")
    index, offset = [], 0
    for b in batches:
        index.append(b.prompt_index + offset)
        offset += int(b.prompt_index.max()) + 1 if len(b) else 0
    with_prompts = all(b.prompt_ids for b in batches)
    with_versions = all(b.versions for b in batches)
    return RolloutBatch(
        prompt_index=torch.cat(index),
        completion_ids=[c for b in batches for c in b.completion_ids],
        logprobs=[lp for b in batches for lp in b.logprobs],
        finish_reason=[r for b in batches for r in b.finish_reason],
        stats=RolloutStats.combined([b.stats for b in batches], concurrent=concurrent),
        prompt_ids=[p for b in batches for p in b.prompt_ids] if with_prompts else [],
        versions=[v for b in batches for v in b.versions] if with_versions else [],
    )


@runtime_checkable
class RolloutEngine(Protocol):
    """A rollout backend: samples completions and takes the trainer's weights. `version` counts the weight syncs
    (0: the weights it started from) and is stamped on every sampled token (`RolloutBatch.versions`)."""

    backend: str
    num_speculative_tokens: int
    version: int

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> RolloutBatch: ...

    def sync_weights(self, model: PolicyModel) -> None: ...

    def offload(self) -> None: ...

    def onload(self) -> None: ...


def token_versions(completion_ids: list[list[int]], version: int) -> list[torch.Tensor]:
    """`RolloutBatch.versions` of completions all sampled by one policy version."""
    return [torch.full((len(c),), int(version), dtype=torch.int64) for c in completion_ids]


def validate_prompts(prompt_ids: list[list[int]], *, vocab_size: int, max_model_len: int, n: int, max_new_tokens: int):
    """Raise early, naming the prompt, for empty prompts, out-of-vocabulary ids or prompts that do not fit."""
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError(f"prompt_ids must be a non-empty list of token-id lists, got {type(prompt_ids).__name__}")
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out = []
    for i, p in enumerate(prompt_ids):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if len(p) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty: every prompt needs at least one token (e.g. <bos>)")
        if len(p) >= max_model_len:
            raise ValueError(
                f"prompt_ids[{i}] has {len(p)} tokens, longer than the maximum: it must be < max_model_len="
                f"{max_model_len} to leave room for at least one generated token"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt_ids[{i}] has ids in [{lo}, {hi}], expected [0, vocab_size={vocab_size})")
        out.append([int(x) for x in p])
    return out


def check_same_config(op: str, model_config: object, engine_config: object, engines: str = "engine's") -> None:
    """A weight update is a copy into the engine's tensors: refuse a model of another architecture by name."""
    if model_config != engine_config:
        raise ValueError(f"{op}: model config {model_config} differs from the {engines} {engine_config}")
