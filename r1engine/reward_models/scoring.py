"""R1's general rewards from reward models: pairwise helpfulness over a prompt's group and pointwise safety.

Helpfulness (`PairwiseHelpfulness`): the responses of a prompt's group are compared in pairs, and a response's
reward is its mean preference against its opponents. A pair-input model reads one comparison with a response shown
first (A) and says how much it prefers A; it may favour a position whatever the texts, so each pair is judged both
ways and the two verdicts averaged:

    pref(x, y) = (f(x shown first, y second) - f(y shown first, x second)) / 2

A constant bias towards A cancels, and pref(x, y) = -pref(y, x) exactly. A single-input model scores each response
alone and pref(x, y) = r(x) - r(y) (no position to bias; each distinct response is scored once). Only the final
summary after the reasoning is shown (`r1engine.reward_models.text.final_summary`). `PairwiseReward` is what every
pairwise judge shares (the summaries, the swap, the pairings, the judge's thread); a language model asked "A or B?"
is one too (`r1engine.reward_models.generative`).

Pairings (who is compared with whom, `PAIRINGS`):
- "round_robin": every pair of the group (G(G-1)/2 pairs); reward = mean over the other G-1 responses.
- "reference": each response against the row's reference response (G pairs); reward = preference over it.
- "best_of_group": the group's best found by a knockout tournament (G-1 pairs in ceil(log2 G) batched rounds, a
  tie won by the earlier response), then each response against it; the best's own reward is that of a tie.

`transform`: "prob" reports sigmoid(pref), the probability of winning in [0, 1], on the scale of the 0/1 rule
rewards (a tie is 0.5); "logit" reports pref itself. Every comparison of a batch's groups goes to the model in one
packed scoring call (one per tournament round).

Safety (`PointwiseSafety`): one score per full response, reasoning included: P(safe) from the classifier ("prob"), or
its logit of safe (a two-logit classifier: log-odds of safe over unsafe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from r1engine.reward_models.inference import RewardScorer
from r1engine.reward_models.text import final_summary

__all__ = [
    "PAIRINGS",
    "TRANSFORMS",
    "HelpfulnessResult",
    "Judge",
    "PairwiseHelpfulness",
    "PairwiseReward",
    "PointwiseSafety",
    "group_rewards",
    "single_input_judge",
    "swap_averaged",
]

PAIRINGS = ("reference", "round_robin", "best_of_group")
TRANSFORMS = ("prob", "logit")

Judge = Callable[[Sequence[Any], Sequence[str], Sequence[str]], torch.Tensor]
"""`judge(prompts, firsts, seconds)`: the preference `[n]` for `firsts[i]` shown first against `seconds[i]`."""


def swap_averaged(judge: Judge, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    """pref(a[i], b[i]) `[n]`: the judge's verdict on (a, b) minus its verdict on (b, a), halved; one judge call."""
    n = len(a)
    if not n:
        return torch.zeros(0)
    f = judge([*prompts, *prompts], [*a, *b], [*b, *a]).float().reshape(-1)
    if f.numel() != 2 * n:
        raise ValueError(f"judge: returned {f.numel()} verdicts for {2 * n} comparisons")
    return (f[:n] - f[n:]) / 2


def single_input_judge(score: Callable[[Sequence[Any], Sequence[str]], torch.Tensor]) -> Judge:
    """A judge from a single-input scorer `score(prompts, responses) -> [n]`: f(x, y) = r(x) - r(y), each distinct
    (prompt, response) scored once per call."""

    def judge(prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        keys: dict[tuple[str, str], int] = {}
        rows: list[tuple[Any, str]] = []
        for p, x in [*zip(prompts, firsts, strict=True), *zip(prompts, seconds, strict=True)]:
            k = (repr(p), x)
            if k not in keys:
                keys[k] = len(rows)
                rows.append((p, x))
        r = score([p for p, _ in rows], [x for _, x in rows]).float().reshape(-1)
        first = torch.tensor([keys[(repr(p), x)] for p, x in zip(prompts, firsts, strict=True)], dtype=torch.long)
        second = torch.tensor([keys[(repr(p), y)] for p, y in zip(prompts, seconds, strict=True)], dtype=torch.long)
        return r[first] - r[second]

    return judge


@dataclass
class HelpfulnessResult:
    """Rewards per group (`rewards[g][i]` for response i of group g), the index of each group's best response
    (best_of_group only) and the number of pairs judged (each judged both ways by a pair-input model)."""

    rewards: list[list[float]]
    best: list[int] | None = None
    pairs_judged: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _transform(pref: torch.Tensor, transform: str) -> torch.Tensor:
    return torch.sigmoid(pref) if transform == "prob" else pref


def group_rewards(
    judge: Judge,
    prompts: Sequence[Any],
    groups: Sequence[Sequence[str]],
    *,
    pairing: str = "round_robin",
    references: Sequence[str | None] | None = None,
    transform: str = "prob",
) -> HelpfulnessResult:
    """Rewards of each group's responses from swap-averaged pairwise preferences (see the module docstring).

    `prompts[g]` is group g's prompt, `groups[g]` its responses, `references[g]` its reference response (pairing
    "reference"). The texts are given to `judge` as they are (`PairwiseHelpfulness` passes final summaries).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform: must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    if len(prompts) != len(groups):
        raise ValueError(f"prompts and groups: one prompt per group, got {len(prompts)} prompts, {len(groups)} groups")
    for g, group in enumerate(groups):
        for i, text in enumerate(group):
            if not isinstance(text, str):
                raise TypeError(f"groups[{g}][{i}]: expected a str response, got {type(text).__name__}")
    if pairing == "reference":
        if references is None or len(references) != len(groups):
            got = "none" if references is None else f"{len(references)}"
            raise ValueError(
                f"references: pairing 'reference' needs one reference per group ({len(groups)}), got {got}"
            )
        for g, ref in enumerate(references):
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"references[{g}]: pairing 'reference' needs a reference response, got {ref!r}")
    tie = float(_transform(torch.zeros(()), transform))
    prefs: dict[tuple[int, int, int], float] = {}  # (group, i, j) -> pref(i, j); j = -1 is the reference

    def judge_pairs(pairs: list[tuple[int, int, int]]) -> None:
        todo = [p for p in pairs if p not in prefs and (p[0], p[2], p[1]) not in prefs]
        if not todo:
            return
        a = [groups[g][i] for g, i, _ in todo]
        b = [groups[g][j] if j >= 0 else references[g] for g, _, j in todo]  # type: ignore[index]
        values = swap_averaged(judge, [prompts[g] for g, _, _ in todo], a, b).tolist()
        prefs.update(zip(todo, values, strict=True))

    def pref(g: int, i: int, j: int) -> float:
        return prefs[(g, i, j)] if (g, i, j) in prefs else -prefs[(g, j, i)]

    rewards: list[list[float]] = []
    best: list[int] | None = None
    if pairing == "reference":
        judge_pairs([(g, i, -1) for g, group in enumerate(groups) for i in range(len(group))])
        rewards = [_transform(torch.tensor([pref(g, i, -1) for i in range(len(group))]), transform).tolist()
                   for g, group in enumerate(groups)]  # fmt: skip
    elif pairing == "round_robin":
        judge_pairs(
            [(g, i, j) for g, group in enumerate(groups) for i in range(len(group)) for j in range(i + 1, len(group))]
        )
        for g, group in enumerate(groups):
            n = len(group)
            row = []
            for i in range(n):
                others = torch.tensor([pref(g, i, j) for j in range(n) if j != i])
                row.append(float(_transform(others, transform).mean()) if n > 1 else tie)
            rewards.append(row)
    else:  # best_of_group: knockout rounds, every group's matches of a round in one call
        alive = [list(range(len(group))) for group in groups]
        while any(len(a) > 1 for a in alive):
            matches = [(g, a[k], a[k + 1]) for g, a in enumerate(alive) for k in range(0, len(a) - 1, 2)]
            judge_pairs(matches)
            alive = [
                [a[k] if k + 1 >= len(a) or pref(g, a[k], a[k + 1]) >= 0 else a[k + 1] for k in range(0, len(a), 2)]
                for g, a in enumerate(alive)
            ]
        best = [a[0] if a else -1 for a in alive]
        judge_pairs([(g, i, best[g]) for g, group in enumerate(groups) for i in range(len(group)) if i != best[g]])
        rewards = [
            [tie if i == best[g] else float(_transform(torch.tensor(pref(g, i, best[g])), transform))
             for i in range(len(group))]
            for g, group in enumerate(groups)
        ]  # fmt: skip
    return HelpfulnessResult(rewards, best, pairs_judged=len(prefs))


class PairwiseReward:
    """Group rewards from a pairwise judge: swap-averaged verdicts through `group_rewards`, on the final summaries,
    computed on the judge model's thread (see the module docstring). Subclasses give `judge` (one verdict per
    comparison, no swap) and a `scorer` that runs the model: `submit(fn, *args)` (a Future, calls one at a time),
    `close()`, `truncated` (inputs cut to its length limit so far) and `name`.

    `pairing`, `transform`: see `group_rewards`. `summary_only`: show the judge only the final summaries (the paper's
    choice; False: whole responses).
    """

    def __init__(
        self, scorer: Any, *, pairing: str = "round_robin", transform: str = "prob", summary_only: bool = True
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing: must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform: must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        self.scorer, self.pairing, self.transform, self.summary_only = scorer, pairing, transform, summary_only

    def judge(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """The verdicts `[n]` on (prompt, first, second) comparisons (no swap): a `Judge`."""
        raise NotImplementedError

    def score_groups(
        self,
        prompts: Sequence[Any],
        groups: Sequence[Sequence[str]],
        references: Sequence[str | None] | None = None,
    ) -> HelpfulnessResult:
        """Rewards of every group's responses (`HelpfulnessResult.rewards[g][i]`)."""
        view = final_summary if self.summary_only else (lambda s: s)
        shown = [[view(r) if isinstance(r, str) else r for r in group] for group in groups]
        refs = [view(r) if isinstance(r, str) else r for r in references] if references is not None else None
        truncated = self.scorer.truncated
        result = group_rewards(
            self.judge, prompts, shown, pairing=self.pairing, references=refs, transform=self.transform
        )
        flat = [x for row in result.rewards for x in row]
        result.metrics = {
            "helpfulness/mean": sum(flat) / len(flat) if flat else float("nan"),
            "helpfulness/pairs_judged": float(result.pairs_judged),
            "helpfulness/empty_summary_frac": sum(not s for g in shown for s in g) / max(1, len(flat)),
            "helpfulness/truncated_inputs": float(self.scorer.truncated - truncated),
        }
        return result

    def __call__(self, prompts, groups, references=None) -> list[list[float]]:
        return self.score_groups(prompts, groups, references).rewards

    def submit(self, prompts, groups, references=None) -> Future:
        """`score_groups` on the scorer's thread; returns a Future of its `HelpfulnessResult`."""
        return self.scorer.submit(self.score_groups, prompts, groups, references)


class PairwiseHelpfulness(PairwiseReward):
    """The helpfulness reward of a pairwise reward model (see the module docstring).

    `scorer`: a `RewardScorer` of a model with `kind="pairwise"`. `pairing`, `transform`, `summary_only`: see
    `PairwiseReward`.
    """

    def __init__(
        self, scorer: RewardScorer, *, pairing: str = "round_robin", transform: str = "prob", summary_only: bool = True
    ) -> None:
        if scorer.fmt.kind != "pairwise":
            raise ValueError(f"{scorer.name}: helpfulness needs a pairwise reward model, this one is {scorer.fmt.kind}")
        super().__init__(scorer, pairing=pairing, transform=transform, summary_only=summary_only)
        self._scores: dict[tuple[str, str], float] | None = None

    def judge(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """The model's verdicts `[n]` on (prompt, first, second) comparisons (no swap)."""
        if self.scorer.fmt.input == "pair":
            return self.scorer.pair_logits(prompts, firsts, seconds)
        return single_input_judge(self._single_scores)(prompts, firsts, seconds)

    def _single_scores(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        """A single-input model's score of each (prompt, response), each scored once per `score_groups` call (the
        tournament rounds of best_of_group compare the same responses again)."""
        cache = self._scores if self._scores is not None else {}
        missing = [(p, r) for p, r in zip(prompts, responses, strict=True) if (repr(p), r) not in cache]
        if missing:
            values = self.scorer.single_logits([p for p, _ in missing], [r for _, r in missing])[:, 0].tolist()
            cache.update({(repr(p), r): v for (p, r), v in zip(missing, values, strict=True)})
        return torch.tensor([cache[(repr(p), r)] for p, r in zip(prompts, responses, strict=True)])

    def score_groups(self, prompts, groups, references=None) -> HelpfulnessResult:
        """`PairwiseReward.score_groups`; a single-input model also reports its mean raw score of the groups'
        responses (`helpfulness/score_mean`): the pairwise rewards of a group average to the same value whatever
        the responses, the raw score shows where the policy stands on the model's scale."""
        if self.scorer.fmt.input == "pair":
            return super().score_groups(prompts, groups, references)
        self._scores = {}
        try:
            result = super().score_groups(prompts, groups, references)
            view = final_summary if self.summary_only else (lambda s: s)
            shown = [(repr(p), view(r)) for p, group in zip(prompts, groups, strict=True) for r in group]
            scores = [self._scores[k] for k in shown if k in self._scores]
            result.metrics["helpfulness/score_mean"] = sum(scores) / len(scores) if scores else float("nan")
        finally:
            self._scores = None
        return result


class PointwiseSafety:
    """The safety reward of a pointwise classifier: one score per full response (see the module docstring)."""

    def __init__(self, scorer: RewardScorer, *, transform: str = "prob") -> None:
        if scorer.fmt.kind != "pointwise":
            raise ValueError(f"{scorer.name}: safety needs a pointwise classifier, this one is {scorer.fmt.kind}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform: must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        self.scorer, self.transform = scorer, transform

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"responses[{i}]: expected a str, got {type(r).__name__}")
        logit = self.scorer.model.safe_logit(self.scorer.single_logits(prompts, responses))
        return (torch.sigmoid(logit) if self.transform == "prob" else logit).tolist()

    def submit(self, prompts: Sequence[Any], responses: Sequence[str]) -> Future:
        """Scores on the scorer's thread; returns a Future of the list."""
        return self.scorer.submit(self, prompts, responses)
