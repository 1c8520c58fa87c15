"""Held-out evaluation as in the R1 paper: pass@1 averaged over several completions sampled per problem
(temperature 0.6, top-p 0.95 by default), with greedy accuracy beside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from r1engine.data import Problem
from r1engine.trainer.config import EvalConfig

EVAL_SEED = 12345  # the same samples for every evaluation of the same weights


def held_out_accuracy(
    generate: Callable[..., Any],
    problems: Sequence[Problem],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    accuracy: Callable[[list[str], list[str]], list[Any]],
    *,
    cfg: EvalConfig,
    max_new_tokens: int,
    stop_token_ids: list[int],
    sum_over_ranks: Callable[[list[float]], list[float]] = list,
) -> dict[str, float]:
    """`eval/accuracy` (pass@1 over `cfg.samples` samples per problem), `eval/greedy_accuracy` and the mean
    completion length of the sampled answers. `generate` is a rollout engine's `generate`; `problems` is this
    rank's share (`sum_over_ranks` adds the counts of all ranks)."""
    prompts = [encode(p.prompt) for p in problems]
    out: dict[str, float] = {}
    for key, n, temperature in (("eval/accuracy", cfg.samples, cfg.temperature), ("eval/greedy_accuracy", 1, 0.0)):
        batch = generate(
            prompts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=cfg.top_p if temperature > 0 else 1.0,
            stop_token_ids=stop_token_ids,
            seed=EVAL_SEED,
        )
        texts = [decode(c) for c in batch.completion_ids]
        answers = [problems[i].answer for i in batch.prompt_index.tolist()]
        correct = sum(r.score for r in accuracy(texts, answers))
        tokens = sum(len(c) for c in batch.completion_ids)
        correct, count, tokens = sum_over_ranks([correct, len(texts), tokens])
        out[key] = correct / count
        if key == "eval/accuracy":
            out["eval/response_len_mean"] = tokens / count
    return out
