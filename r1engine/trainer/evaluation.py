"""Held-out evaluation as in the R1 paper: pass@1 averaged over several completions sampled per problem
(temperature 0.6, top-p 0.95 by default), with greedy accuracy beside it; per data source when there are several.

An answer is right when every correctness reward of its row's route scores 1 (`RewardRoutes.correctness`: the
route without the shaping rewards, format and language consistency).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from r1engine.data import Problem
from r1engine.rewards import CombinedReward
from r1engine.rewards.routing import RewardRoutes
from r1engine.rewards.scheduler import build_reward_fns
from r1engine.trainer.config import EvalConfig

EVAL_SEED = 12345  # the same samples for every evaluation of the same weights


class Correctness:
    """Judges answers of rows from any source: 1.0 when every correctness reward of the row's route scores 1."""

    def __init__(
        self,
        routes: RewardRoutes,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        functions: Mapping[str, Any] | None = None,
    ) -> None:
        self.routes = routes.correctness()
        options = {k: v for k, v in (options or {}).items() if k in self.routes.names}
        fns = build_reward_fns(self.routes.names, options, functions)
        self._rewards = {key: CombinedReward(w, fns=fns) for key in self.routes.keys if (w := self.routes.weights(key))}

    def __call__(self, texts: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        out = [0.0] * len(texts)
        by_route: dict[str, list[int]] = {}
        for i, p in enumerate(problems):
            by_route.setdefault(self.routes.route_of(p.source), []).append(i)
        for route, rows in by_route.items():
            result = self._rewards[route].evaluate([texts[i] for i in rows], [problems[i].answer for i in rows])
            for j, i in enumerate(rows):
                out[i] = float(all(res[j].score >= 1.0 - 1e-9 for res in result.per_function.values()))
        return out


def held_out_accuracy(
    generate: Callable[..., Any],
    problems: Sequence[Problem],
    encode: Callable[[Any], list[int]],
    decode: Callable[[list[int]], str],
    correct: Callable[[list[str], list[Problem]], list[float]],
    *,
    cfg: EvalConfig,
    max_new_tokens: int,
    stop_token_ids: list[int],
    sum_over_ranks: Callable[[list[float]], list[float]] = list,
    sources: Sequence[str] | None = None,
) -> dict[str, float]:
    """`eval/accuracy` (pass@1 over `cfg.samples` samples per problem) and its standard error over problems
    (`eval/accuracy_stderr`), `eval/greedy_accuracy`, the mean completion length of the sampled answers, and
    `eval/accuracy/<source>` per data source when there are several. `generate` is a rollout engine's `generate`;
    `problems` is this rank's share (`sum_over_ranks` adds the counts of all ranks; `sources`: the data sources of
    the whole held-out set, the same on every rank)."""
    prompts = [encode(p.prompt) for p in problems]
    sources = sorted(set(sources) if sources is not None else {p.source for p in problems})
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
        rows = [problems[i] for i in batch.prompt_index.tolist()]
        scores = correct(texts, rows)
        tokens = sum(len(c) for c in batch.completion_ids)
        per_problem = [0.0] * len(problems)  # pass@1 of each problem: the mean over its samples
        for i, score in zip(batch.prompt_index.tolist(), scores, strict=True):
            per_problem[i] += score / n
        moments = [float(len(per_problem)), sum(per_problem), sum(x * x for x in per_problem)]
        per_source = [x for s in sources for x in _count(scores, rows, s)] if len(sources) > 1 else []
        totals = sum_over_ranks([sum(scores), len(texts), tokens, *moments, *per_source])
        out[key] = totals[0] / totals[1]
        if key == "eval/accuracy":
            out["eval/response_len_mean"] = totals[2] / totals[1]
            count, s1, s2 = totals[3:6]
            variance = (s2 - s1 * s1 / count) / (count - 1) if count > 1 else math.nan
            out["eval/accuracy_stderr"] = math.sqrt(max(variance, 0.0) / count) if count > 1 else math.nan
            for j, source in enumerate(sources if len(sources) > 1 else []):
                right, total = totals[6 + 2 * j], totals[7 + 2 * j]
                out[f"eval/accuracy/{source or 'default'}"] = right / total if total else math.nan
    return out


def _count(scores: Sequence[float], rows: Sequence[Problem], source: str) -> tuple[float, float]:
    picked = [s for s, p in zip(scores, rows, strict=True) if p.source == source]
    return float(sum(picked)), float(len(picked))
