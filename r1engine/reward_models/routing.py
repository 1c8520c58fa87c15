"""Reward models named in reward routes: a route's reward called `rm:<name>` is scored by the reward model loaded
under `<name>` (the rule rewards keep their plain names), so R1's second stage routes reasoning rows to rule rewards
and general rows to the helpfulness and safety models, e.g.

    rewards.routes: {math: {math_accuracy: 1, format: 1}, helpful: {"rm:helpfulness": 1}, harmless: {"rm:safety": 1}}

`check_routes` refuses, before anything is scored, a route naming a model that is not loaded (naming the route's
config key); `rows_by_model` says which rows each model scores and names the row whose route is at fault.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from r1engine.rewards.routing import DEFAULT, RewardRoutes

__all__ = ["RM_PREFIX", "check_routes", "is_model_reward", "model_name", "rows_by_model", "split_weights"]

RM_PREFIX = "rm:"


def is_model_reward(name: str) -> bool:
    """Whether a reward name in a route names a reward model (`rm:<name>`)."""
    return isinstance(name, str) and name.startswith(RM_PREFIX)


def model_name(name: str) -> str:
    """The reward model's name in `rm:<name>`."""
    if not is_model_reward(name) or not name[len(RM_PREFIX) :]:
        raise ValueError(f"{name!r}: not a reward-model reward (expected {RM_PREFIX}<name>)")
    return name[len(RM_PREFIX) :]


def split_weights(weights: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A route's weights split into (rule rewards by name, reward models by model name)."""
    rules = {k: float(v) for k, v in weights.items() if not is_model_reward(k)}
    models = {model_name(k): float(v) for k, v in weights.items() if is_model_reward(k)}
    return rules, models


def _route_key(route: str) -> str:
    return "rewards.weights" if route == DEFAULT else f"rewards.routes.{route}"


def check_routes(routes: RewardRoutes, models: Collection[str]) -> None:
    """Raise a ValueError naming the config key (`rewards.routes.<source>.rm:<name>`) of the first reward model a
    route names that is not in `models`."""
    for route in routes.keys:
        for name in routes.weights(route):
            if is_model_reward(name) and model_name(name) not in models:
                raise ValueError(
                    f"{_route_key(route)}.{name}: no reward model named {model_name(name)!r} is loaded "
                    f"(loaded: {', '.join(sorted(models)) or 'none'})"
                )


def rows_by_model(sources: Sequence[str], routes: RewardRoutes, models: Collection[str]) -> dict[str, list[int]]:
    """For each loaded reward model that some row's route uses, the rows it scores (in order). A row whose route
    names a model that is not loaded raises a ValueError naming the row, its source and the route's key."""
    out: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        route = routes.route_of(source)
        for name in routes.weights(route):
            if not is_model_reward(name):
                continue
            model = model_name(name)
            if model not in models:
                raise ValueError(
                    f"row {i} (source {source!r}): its route {_route_key(route)} names reward model {model!r}, which "
                    f"is not loaded (loaded: {', '.join(sorted(models)) or 'none'})"
                )
            out.setdefault(model, []).append(i)
    return out
