"""The off-policy rollout modes (`rollout.mode: one_step_off | async`): `RolloutScheduler` keeps generations in
flight in the rollout worker process while the trainer trains.

Order of events. The worker (`RemoteRolloutEngine`) serves its requests in order. At the start of step k the
scheduler tops its queue up to the batches of steps k .. k + lookahead (lookahead 1 for one_step_off,
`rollout.max_staleness` for async), each taking its prompts from the data stream; after step k's optimizer step the
trainer queues the weights of version k + 1 (`push_weights`: copied at once, broadcast in the background). So the
batch submitted at step k samples with version k and is trained at step k + lookahead: generation overlaps training.

Versions and staleness. A policy version is the number of optimizer steps behind the weights (the engine is told
the trainer's step, a resumed run included). Every sampled token carries the version that sampled it
(`RolloutBatch.versions`); a batch's staleness is the trained weights' version minus its oldest token's. A batch above
`max_staleness` (which the order above never produces, but a push that was skipped or a regeneration could) is
dropped and its prompts are sampled again with the newest weights, counted in `rollout/dropped_stale`.

The off-policy correction. The loss's "old" log-probs must be the behaviour policy's, the weights that sampled each
token. Here they are the sampler's own log-probs (`grpo.old_logprobs=sampler`: the ratio is pi_theta / pi_behaviour,
per token with the version of that token), or the trainer's recomputed ones corrected by the sampler's
(`recompute` + `grpo.rollout_correction`: decoupled PPO, clipped around the current weights, importance-weighted by
pi_current / pi_behaviour). Engines report log softmax(raw logits), the sampling distribution only at temperature 1
without top-p / top-k, so the config requires exactly that in these modes (`_validate_rollout_mode`).

Partial rollouts (`rollout.partial_rollouts`). Each batch is generated in segments (`r1engine.rollout.partial`): the
weights pushed after step k reach the worker at the next segment boundary of the generation in progress, whose
remaining tokens sample with them. Staleness can only fall, and every token keeps the version and log-prob it was
sampled with, so the correction above is unchanged.

Checkpoints. The data position saved is that of the last batch trained (`trained_stream_state`): the batches in flight
are not in the checkpoint, and a resumed run samples their prompts again, so none is lost or repeated.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from r1engine.data.problem import Problem
from r1engine.rollout.base import RolloutBatch
from r1engine.rollout.partial import mixed_version_fraction


@dataclass
class InFlight:
    """One batch's generation: its step, prompts, the engine's handle, the data position after its prompts."""

    step: int
    problems: list[Problem]
    prompts: list[list[int]]
    handle: Any
    stream_state: Any
    rollout: RolloutBatch | None = None
    rewards: Any = None  # the reward handle, once the batch is collected and scored
    staleness: int = 0
    staleness_mean: float = 0.0
    regenerated: bool = False


@dataclass
class SchedulerStats:
    dropped_stale: int = 0
    staleness: list[int] = field(default_factory=list)


class RolloutScheduler:
    """The generations in flight, their versions, the staleness check and the metrics.

    `engine`: a `RemoteRolloutEngine` (`submit`, `push_weights`, `version`). `take(step)`: the problems of a step's
    batch (from the trainer's stream: every rank takes alike). `encode`: a problem's prompt ids. `sampling(step)`: the
    generation's keyword arguments (the step's seed). `score(problems, rollout, step)`: submits the batch's rewards
    and returns their handle. `stream_state()`: the data position now. `last_step`: no batch is sampled for it or
    beyond (the run's `grpo.steps`). `segment_tokens`: generate as partial rollouts in segments of that many tokens
    (`r1engine.rollout.partial`), None for whole batches.
    """

    def __init__(
        self,
        engine: Any,
        *,
        lookahead: int,
        max_staleness: int,
        take: Callable[[int], list[Problem]],
        encode: Callable[[Problem], list[int]],
        sampling: Callable[[int], dict[str, Any]],
        score: Callable[[list[Problem], RolloutBatch, int], Any],
        stream_state: Callable[[], Any],
        last_step: int,
        segment_tokens: int | None = None,
    ) -> None:
        if lookahead < 0 or max_staleness < 0:
            raise ValueError(f"lookahead and max_staleness must be >= 0, got {lookahead} and {max_staleness}")
        self.engine = engine
        self.lookahead, self.max_staleness, self.last_step = lookahead, max_staleness, last_step
        self._take, self._encode, self._sampling, self._score = take, encode, sampling, score
        self._stream_state = stream_state
        self.segment_tokens = segment_tokens
        self._queue: deque[InFlight] = deque()
        self._trained_state = stream_state()
        self.stats = SchedulerStats()
        self.last: InFlight | None = None  # the batch most recently handed to the trainer

    # ------------------------------------------------------------------------------------------- submitting
    def _submit(self, step: int, problems: list[Problem], prompts: list[list[int]]) -> Any:
        sampling = self._sampling(step)
        if self.segment_tokens:
            sampling["segment_tokens"] = self.segment_tokens
        return self.engine.submit(prompts, **sampling)

    def fill(self, step: int) -> None:
        """Submit the batches of steps up to `step + lookahead` not yet in flight (with the newest weights queued)."""
        next_step = self._queue[-1].step + 1 if self._queue else step
        while next_step <= min(step + self.lookahead, self.last_step - 1):
            problems = self._take(next_step)
            prompts = [self._encode(p) for p in problems]
            handle = self._submit(next_step, problems, prompts)
            self._queue.append(InFlight(next_step, problems, prompts, handle, self._stream_state()))
            next_step += 1

    # ------------------------------------------------------------------------------------------- collecting
    def _collect(self, entry: InFlight) -> None:
        if entry.rollout is None:
            entry.rollout = entry.handle.result()
            entry.rewards = self._score(entry.problems, entry.rollout, entry.step)  # scored as soon as it is here

    def score_ready(self) -> None:
        """Collect (and send to the reward workers) the batches already generated, without waiting."""
        for entry in self._queue:
            if entry.rollout is None and entry.handle.done():
                self._collect(entry)

    def next(self, step: int, version: int) -> InFlight:
        """The batch to train at `step` with the weights of `version`: its generation collected, its rewards
        submitted, its staleness within `max_staleness` (a staler one is sampled again with the newest weights)."""
        self.fill(step)
        entry = self._queue[0]
        if entry.step != step:
            raise RuntimeError(
                f"rollout scheduler: the batch in front is step {entry.step}'s, the trainer is at {step}"
            )
        self._collect(entry)
        while (staleness := version - oldest_version(entry.rollout)) > self.max_staleness:
            self.stats.dropped_stale += 1
            entry.handle = self._submit(entry.step, entry.problems, entry.prompts)
            entry.rollout, entry.regenerated = None, True
            self._collect(entry)
        if staleness < 0:
            raise RuntimeError(f"rollout scheduler: batch of step {step} sampled by version > {version} (the trained)")
        self._queue.popleft()
        entry.staleness = staleness
        tokens = torch.cat(entry.rollout.versions) if entry.rollout.versions else torch.zeros(0, dtype=torch.long)
        entry.staleness_mean = float((version - tokens).float().mean()) if len(tokens) else float(staleness)
        self.stats.staleness.append(staleness)
        self._trained_state = entry.stream_state
        self.last = entry
        return entry

    def after_step(self, model: Any, version: int) -> None:
        """Queue the trained weights (`version`) for the worker and score what it has finished meanwhile."""
        self.engine.push_weights(model, version=version)
        self.score_ready()

    # ------------------------------------------------------------------------------------------- state
    def trained_stream_state(self) -> Any:
        """The data position after the last batch handed to the trainer (what a checkpoint saves)."""
        return self._trained_state

    def metrics(self) -> dict[str, float]:
        """The last batch's `rollout/staleness_max` (the batch's) and `_mean` (over its tokens, each the trained
        version minus its own), `rollout/partial_frac` (the share of its completions sampled by more than one version,
        resumed after a weight update), and the run's `rollout/dropped_stale` so far."""
        entry = self.last
        return {
            "rollout/staleness_max": float(entry.staleness) if entry is not None else 0.0,
            "rollout/staleness_mean": entry.staleness_mean if entry is not None else 0.0,
            "rollout/dropped_stale": float(self.stats.dropped_stale),
            "rollout/in_flight": float(len(self._queue)),
            "rollout/partial_frac": mixed_version_fraction(entry.rollout) if entry is not None else 0.0,
        }

    def discard(self) -> None:
        """Forget the batches in flight (their prompts come again from the checkpoint's data position)."""
        self._queue.clear()


class RolloutProcessLost(RuntimeError):
    """The rollout worker process died during a run; the run stopped, its last checkpoint is intact."""

    @classmethod
    def of(cls, died: Any, step: int, checkpoints: Any) -> RolloutProcessLost:
        """From a `RolloutWorkerDied` at trainer step `step`, naming the checkpoint a rerun resumes from."""
        code = died.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        latest = checkpoints.latest()
        then = (
            f"its checkpoint {latest} is intact: run the same command again to resume from it"
            if latest is not None
            else "no checkpoint was written yet: run again with checkpoint.resume=false to start over"
        )
        return cls(f"rollout worker process {died.pid} died ({how}) in step {step + 1}; the run stopped, {then}")


def oldest_version(batch: RolloutBatch) -> int:
    """The oldest policy version among a batch's tokens (the engine's version when none were recorded)."""
    versions = [int(v.min()) for v in batch.versions if len(v)]
    if not versions:
        raise ValueError("rollout batch without token versions: the off-policy modes need RolloutBatch.versions")
    return min(versions)
