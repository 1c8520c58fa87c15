"""Weighted combination of named rewards, with per-function metrics ready for logging.

``CombinedReward({"format": 1.0, "math_accuracy": 1.0}, {"format": {"partial": True}})`` builds each
reward by name (:func:`~r1engine.rewards.registry.get_reward`) and scores a batch as
``sum_k w_k * r_k``. A reward function that raises does not fail the batch: its samples get
``failure_value`` with reason ``"error: ..."`` (logged once per batch).

References: when a sample's reference is a dict whose keys include reward names, each reward gets its
own entry (``{"math_accuracy": "\\frac12", "code": {...}}``, missing -> None); otherwise the same
reference goes to every reward.

Row fields: ``evaluate(..., columns={"difficulty": [...], ...})`` hands the batch's other data-set columns (one list
per column) as keyword arguments to every reward function that takes ``**kwargs`` (TRL's convention for custom
rewards); the built-in rewards do not take them.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .registry import RewardFn, RewardResult, check_batch, get_reward

_log = logging.getLogger(__name__)


@dataclass
class CombinedResult:
    """Scores of one batch: ``scores[i]`` weighted sum; ``per_function[name][i]`` each reward's result."""

    scores: list[float]
    per_function: dict[str, list[RewardResult]]
    metrics: dict[str, float]


def _is_timeout(reason: str | None) -> bool:
    return reason is not None and "timeout" in reason


def _is_error(reason: str | None) -> bool:
    return reason is not None and reason.startswith(("error", "killed", "worker", "sandbox error"))


def reward_metrics(
    per_function: Mapping[str, Sequence[RewardResult]], scores: Sequence[float], weights: Mapping[str, float]
) -> dict[str, float]:
    """Logging dict: ``reward/mean``, ``reward/std`` and per function ``<name>/mean``, ``/pass_rate``
    (score >= 1), ``/timeouts``, ``/errors`` (counts)."""
    out: dict[str, float] = {}
    n = len(scores)
    if n:
        mean = sum(scores) / n
        out["reward/mean"] = mean
        out["reward/std"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
    for name, results in per_function.items():
        if not results:
            continue
        vals = [r.score for r in results]
        out[f"{name}/mean"] = sum(vals) / len(vals)
        out[f"{name}/pass_rate"] = sum(1 for v in vals if v >= 1.0 - 1e-9) / len(vals)
        out[f"{name}/timeouts"] = float(sum(1 for r in results if _is_timeout(r.reason)))
        out[f"{name}/errors"] = float(sum(1 for r in results if _is_error(r.reason)))
        out[f"{name}/weight"] = float(weights.get(name, 0.0))
    return out


def takes_columns(fn: Any) -> bool:
    """Whether a reward function accepts the row's other columns as keyword arguments (it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()  # a callable object: its __call__'s signature
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class CombinedReward:
    """Weighted sum of named rewards.

    Args:
        weights: reward name (or ``"pkg.mod:attr"``) -> weight.
        options: reward name -> keyword options for its constructor.
        failure_value: score given to every sample of a reward function that raised.
        fns: reward functions already built, by name (shared by several routes); the others are built here.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        options: Mapping[str, Mapping[str, Any]] | None = None,
        failure_value: float = 0.0,
        fns: Mapping[str, RewardFn] | None = None,
    ):
        if not weights:
            raise ValueError("CombinedReward: weights must name at least one reward, got {}")
        options = dict(options or {})
        unknown = set(options) - set(weights) - set(fns or {})
        if unknown:
            raise ValueError(f"CombinedReward: options given for rewards not in weights: {sorted(unknown)}")
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.failure_value = float(failure_value)
        built = dict(fns or {})
        self.fns: dict[str, RewardFn] = {
            name: built[name] if name in built else get_reward(name, **options.get(name, {})) for name in self.weights
        }

    def _refs_for(self, name: str, references: Sequence[Any]) -> list[Any]:
        out = []
        for ref in references:
            if isinstance(ref, dict) and any(k in self.weights for k in ref):
                out.append(ref.get(name))
            else:
                out.append(ref)
        return out

    def evaluate(
        self, completions: Sequence[str], references: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None
    ) -> CombinedResult:
        """Score a batch; never raises because a reward function failed. `columns`: see the module docstring."""
        check_batch("CombinedReward", completions, references)
        n = len(completions)
        per: dict[str, list[RewardResult]] = {}
        for name, fn in self.fns.items():
            try:
                kwargs = dict(columns) if columns and takes_columns(fn) else {}
                res = list(fn(completions, self._refs_for(name, references), **kwargs))
                if len(res) != n:
                    raise ValueError(f"returned {len(res)} results for {n} completions")
                res = [r if isinstance(r, RewardResult) else RewardResult(float(r)) for r in res]
            except Exception as e:  # noqa: BLE001 - a broken reward must not kill the training step
                _log.warning("reward %s failed on a batch of %d: %s: %s", name, n, type(e).__name__, e)
                res = [RewardResult(self.failure_value, f"error: {type(e).__name__}: {str(e)[:160]}")] * n
            per[name] = res
        scores = [sum(self.weights[k] * per[k][i].score for k in per) for i in range(n)]
        return CombinedResult(scores, per, reward_metrics(per, scores, self.weights))

    def __call__(self, completions: Sequence[str], references: Sequence[Any]) -> list[RewardResult]:
        """The RewardFn contract: weighted scores (reasons joined as ``name: reason``)."""
        res = self.evaluate(completions, references)
        out = []
        for i, s in enumerate(res.scores):
            reasons = [f"{k}: {v[i].reason}" for k, v in res.per_function.items() if v[i].reason]
            out.append(RewardResult(s, "; ".join(reasons) or None))
        return out
