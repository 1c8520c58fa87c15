"""Reward routing: which reward functions, with which weights, score a row, picked by the row's data source.

    RewardRoutes({"math_accuracy": 1, "format": 1}, {"humaneval": {"code": 1}})

scores rows whose source is "humaneval" with the code reward alone and every other row with math accuracy + format
(the default route). A default route may be empty when the routes name every source; a row of a source that has no
route then is an error, raised before any scoring (`check_sources`).

Held-out accuracy asks only whether an answer is right: `correctness()` keeps each route's non-shaping rewards
(format and language consistency shape how an answer is written, not whether it is right).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DEFAULT = ""
"""The key of the default route."""
SHAPING = frozenset({"format", "language"})
"""Rewards about how an answer is written rather than whether it is right."""


class RewardRoutes:
    """A default route and one route per named data source; see the module docstring."""

    def __init__(self, default: Mapping[str, float], routes: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._routes: dict[str, dict[str, float]] = {DEFAULT: {str(k): float(v) for k, v in default.items()}}
        for source, weights in (routes or {}).items():
            if not weights:
                raise ValueError(f"rewards.routes.{source}: a route needs at least one reward")
            self._routes[str(source)] = {str(k): float(v) for k, v in weights.items()}
        if not any(self._routes.values()):
            raise ValueError("rewards.weights: no reward in the default route and no rewards.routes")

    @classmethod
    def from_config(cls, config: Mapping) -> RewardRoutes:
        """From `{"weights": {...}, "routes": {...}}` (a plain `{name: weight}` is the default route alone)."""
        if "weights" in config or "routes" in config:
            return cls(config.get("weights") or {}, config.get("routes") or {})
        return cls(config)

    @property
    def names(self) -> list[str]:
        """Every reward some route uses, in first-use order."""
        out: list[str] = []
        for weights in self._routes.values():
            out.extend(n for n in weights if n not in out)
        return out

    @property
    def keys(self) -> list[str]:
        """The route keys (`DEFAULT` first)."""
        return list(self._routes)

    def route_of(self, source: str) -> str:
        """The route key scoring rows of `source`."""
        if source in self._routes and source != DEFAULT:
            return source
        if not self._routes[DEFAULT]:
            named = ", ".join(k for k in self._routes if k != DEFAULT)
            raise ValueError(
                f"rewards.routes: no route for data source {source!r} and no default route (rewards.weights is "
                f"empty); routes exist for: {named}"
            )
        return DEFAULT

    def weights(self, route: str) -> dict[str, float]:
        return dict(self._routes[route])

    def check_sources(self, sources: Iterable[str]) -> None:
        """Raise (naming the source) when some source has no route to score it."""
        for source in sorted(set(sources)):
            self.route_of(source)

    def correctness(self) -> RewardRoutes:
        """The same routes restricted to the rewards that judge correctness (all of a route's rewards when it has
        only shaping ones)."""

        def keep(weights: Mapping[str, float]) -> dict[str, float]:
            right = {k: v for k, v in weights.items() if k not in SHAPING}
            return right or dict(weights)

        return RewardRoutes(keep(self._routes[DEFAULT]), {k: keep(w) for k, w in self._routes.items() if k != DEFAULT})
