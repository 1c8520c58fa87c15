"""The trainer's reward models: routes that name `rm:<name>` (R1's general rewards beside the rule rewards).

    reward_models: {helpful: {path: runs/rm-helpful/model, pairing: round_robin}}
    # or, without a trained reward model, a causal LM asked "A or B?" (r1engine.reward_models.generative):
    reward_models: {helpful: {path: models/SmolLM2-135M-Instruct, kind: generative, backend: hf}}
    rewards: {routes: {math: {math_accuracy: 1, format: 1}, general: {"rm:helpful": 1, language_consistency: 0.5}},
              model_rewards_from_step: 1300}

Each row is scored by its source's route: the rule rewards of the route in the reward workers (`RewardScheduler`),
the reward models of the route on their own scorer threads (one `RewardScorer` per model, on its device or
offloaded), submitted right after the rule rewards so that both overlap the log-prob inference. A row's reward is the
weighted sum of both. Before `rewards.model_rewards_from_step` the models are not run, and their rows get the rule
rewards of their route alone (0 for a route that has none).

`ModelRewards.submit` returns a handle whose `result()` is one `RewardBatch` of the whole batch, like the
scheduler's: per-function lists of the rule rewards (NaN where a row's route has none), per-source means of the
combined rewards, and per model `reward/rm/<name>/mean` with `reward/rm/active` (0 before the switch step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from r1engine.reward_models.generative import GenerativeHelpfulness, GenerativeJudge
from r1engine.reward_models.inference import RewardScorer
from r1engine.reward_models.routing import is_model_reward, model_name, rows_by_model, split_weights
from r1engine.reward_models.scoring import HelpfulnessResult, PairwiseHelpfulness, PairwiseReward, PointwiseSafety
from r1engine.rewards.routing import DEFAULT, RewardRoutes
from r1engine.rewards.scheduler import RewardBatch
from r1engine.trainer.config import Config, ConfigError, RewardModelConfig

__all__ = ["ModelRewards", "rule_routes"]


def rule_routes(routes: RewardRoutes) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The routes' rule rewards alone, as (default weights, {source: weights}); sources whose route has only reward
    models are left out (their rows never reach the reward workers)."""
    default = split_weights(routes.weights(DEFAULT))[0]
    per_source = {}
    for key in routes.keys:
        if key != DEFAULT and (rules := split_weights(routes.weights(key))[0]):
            per_source[key] = rules
    return default, per_source


class ModelRewards:
    """The reward models the routes name, loaded from `reward_models.<name>` (see the module docstring)."""

    def __init__(self, cfg: Config, routes: RewardRoutes, device: torch.device | str) -> None:
        self.routes = routes
        self.from_step = cfg.rewards.model_rewards_from_step
        used = sorted({model_name(n) for n in routes.names if is_model_reward(n)})
        self.judges: dict[str, PairwiseReward | PointwiseSafety] = {}
        for name in used:
            spec = cfg.reward_models.get(name)
            if spec is None:
                known = ", ".join(sorted(cfg.reward_models)) or "none"
                raise ConfigError(f"rm:{name}: a route names reward model {name!r}, not in reward_models ({known})")
            key = f"reward_models.{name}"
            if spec.kind == "generative":
                self.judges[name] = _generative_judge(spec, key, device, name)
                continue
            try:
                scorer = RewardScorer.from_pretrained(
                    spec.path, tokenizer=spec.tokenizer, dtype=getattr(torch, spec.dtype), key=f"{key}.path",
                    device=spec.device or device, offload=spec.offload, token_budget=spec.token_budget,
                    max_length=spec.max_length, name=name,
                )  # fmt: skip
            except (OSError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"{key}: the reward model did not load: {exc}") from None
            kind = spec.kind if spec.kind != "auto" else ("helpfulness" if scorer.fmt.kind == "pairwise" else "safety")
            try:
                if kind == "helpfulness":
                    judge = PairwiseHelpfulness(scorer, pairing=spec.pairing, transform=spec.transform)
                else:
                    judge = PointwiseSafety(scorer, transform=spec.transform)
            except ValueError as exc:
                raise ConfigError(f"{key}.kind: {exc}") from None
            self.judges[name] = judge

    def __bool__(self) -> bool:
        return bool(self.judges)

    def active(self, step: int) -> bool:
        """Whether the reward models count at `step` (`rewards.model_rewards_from_step`)."""
        return bool(self.judges) and step >= self.from_step

    def has_rules(self, source: str) -> bool:
        """Whether rows of `source` have rule rewards in their route."""
        return bool(split_weights(self.routes.weights(self.routes.route_of(source)))[0])

    def submit(
        self, rule_handle: Any, rule_rows: list[int], texts: Sequence[str], problems: Sequence[Any],
        owner: Sequence[int], step: int,
    ) -> ScoredBatch:  # fmt: skip
        """Submit the model scoring of the batch's rows (completion i of prompt `owner[i]`, row `problems[i]`) whose
        route names a model; `rule_handle` scores `rule_rows` (the rows with rule rewards) meanwhile."""
        sources = [p.source for p in problems]
        active = self.active(step)
        futures: dict[str, tuple[list[int], Future]] = {}
        if active:
            try:
                by_model = rows_by_model(sources, self.routes, self.judges)
            except ValueError as exc:
                from r1engine.data.dataset import DataError

                raise DataError(str(exc)) from None
            for name, rows in by_model.items():
                judge = self.judges[name]
                if isinstance(judge, PointwiseSafety):
                    futures[name] = (rows, judge.submit([problems[i].prompt for i in rows], [texts[i] for i in rows]))
                    continue
                groups: dict[int, list[int]] = {}
                for i in rows:
                    groups.setdefault(owner[i], []).append(i)
                members = list(groups.values())
                prompts = [problems[m[0]].prompt for m in members]
                refs = [_text(problems[m[0]].answer) for m in members] if judge.pairing == "reference" else None
                future = judge.submit(prompts, [[texts[i] for i in m] for m in members], refs)
                futures[name] = ([i for m in members for i in m], future)
        return ScoredBatch(rule_handle, rule_rows, sources, self.routes, futures, active)

    def close(self) -> None:
        for judge in self.judges.values():
            judge.scorer.close()


def _generative_judge(spec: RewardModelConfig, key: str, device: torch.device | str, name: str) -> PairwiseReward:
    """`reward_models.<name>` with kind generative: a causal LM as the pairwise helpfulness judge."""
    options = {"template": spec.judge_template} if spec.judge_template is not None else {}
    try:
        judge = GenerativeJudge.from_pretrained(
            spec.path, backend=spec.backend, tokenizer=spec.tokenizer, dtype=spec.dtype, key=f"{key}.path",
            device=(spec.device or device) if spec.backend == "hf" else None, offload=spec.offload,
            token_budget=spec.token_budget, max_length=spec.max_length, name=name, **options,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{key}: the generative judge did not load: {exc}") from None
    return GenerativeHelpfulness(judge, pairing=spec.pairing, transform=spec.transform)


def _text(answer: Any) -> str | None:
    return answer if isinstance(answer, str) else (None if answer is None else str(answer))


class ScoredBatch:
    """A batch scored by rule rewards and reward models; `result()` waits for both (see the module docstring)."""

    def __init__(
        self,
        rule_handle: Any,
        rule_rows: list[int],
        sources: list[str],
        routes: RewardRoutes,
        futures: Mapping[str, tuple[list[int], Future]],
        active: bool,
    ) -> None:
        self._rule, self._rule_rows, self._sources = rule_handle, rule_rows, sources
        self._routes, self._futures, self._active = routes, futures, active

    def result(self, timeout: float | None = None) -> RewardBatch:
        n, nan = len(self._sources), float("nan")
        scores = [0.0] * n
        per_function: dict[str, list[float]] = {}
        reasons: dict[str, list[str | None]] = {}
        metrics: dict[str, float] = {}
        if self._rule is not None:
            rule = self._rule.result(timeout)
            for j, i in enumerate(self._rule_rows):
                scores[i] = rule.scores[j]
            for name, values in rule.per_function.items():
                per_function[name] = [nan] * n
                reasons[name] = [None] * n
                for j, i in enumerate(self._rule_rows):
                    per_function[name][i] = values[j]
                    reasons[name][i] = rule.reasons[name][j]
            metrics.update({k: v for k, v in rule.metrics.items() if not k.startswith("reward/source/")})
        metrics["reward/rm/active"] = float(self._active)
        for name, (rows, future) in self._futures.items():
            out = future.result(timeout)
            if isinstance(out, HelpfulnessResult):
                values = [x for group in out.rewards for x in group]
                for k, v in out.metrics.items():
                    if not k.endswith("/mean"):
                        metrics[f"reward/rm/{name}/{k.split('/', 1)[1]}"] = v
            else:
                values = list(out)
            key = f"rm:{name}"
            for i, v in zip(rows, values, strict=True):
                route = self._routes.route_of(self._sources[i])
                scores[i] += self._routes.weights(route)[key] * float(v)
            metrics[f"reward/rm/{name}/mean"] = sum(values) / len(values) if values else nan
            metrics[f"reward/rm/{name}/rows"] = float(len(values))
        if n:
            mean = sum(scores) / n
            metrics["reward/mean"] = mean
            metrics["reward/std"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
        for source in sorted(set(self._sources)):
            rows = [s for s, src in zip(scores, self._sources, strict=True) if src == source]
            metrics[f"reward/source/{source or 'default'}/mean"] = sum(rows) / len(rows)
        return RewardBatch(scores=scores, per_function=per_function, reasons=reasons, metrics=metrics)
