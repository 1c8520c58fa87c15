"""`rollout.mode` one_step_off / async (issue 20): the trainer with its rollout engine in a worker process of its own.

Real parts throughout: the tiny policy, the native engine in a spawned worker, weights over gloo, the reward workers.
Checked: sync mode through the worker trains exactly what the in-process engine trains; one_step_off trains on
samples of staleness 1 (0 at the first step) and async never above rollout.max_staleness (a staler batch is dropped
and sampled again); the old log-probs the loss gets are the log-probs of the weights (the version) that sampled each
token; a checkpoint's data position is the last trained batch's, so a resumed run neither loses nor repeats prompts;
a kill -9 of the worker stops the run with a message naming the checkpoint to resume from.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyConfig, PolicyModel
from r1engine.rollout.remote import RemoteRolloutEngine
from r1engine.trainer.async_rollout import RolloutProcessLost, RolloutScheduler
from r1engine.trainer.config import ConfigError, load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics
from r1engine.trainer.sequences import loss_tokens, pack, packed_logprobs, per_sequence

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.preset=tiny",
    "task.max_digits=2",
    "task.num_eval=8",
    "sft.steps=4",
    "sft.batch_size=8",
    "grpo.prompts_per_step=4",
    "grpo.group_size=4",
    "grpo.mini_batches=2",
    "grpo.max_new_tokens=24",
    "grpo.lr=1.0e-3",
    "grpo.beta=0.01",
    "training.chunk_len=64",
    "training.num_threads=1",
    "training.deterministic=true",
    "rollout.backend=native",
    "rollout.num_threads=1",
    "rewards.weights={arithmetic: 1.0, format: 1.0}",
    "eval.every=100",
    "checkpoint.every=0",
]
OFF_POLICY = ["grpo.old_logprobs=sampler"]


def _config(out_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={out_dir}", *TINY, *extra])


def _trainer(out_dir: Path, *extra: str) -> GRPOTrainer:
    return GRPOTrainer(_config(out_dir, *extra), progress=False)


def _run(trainer: GRPOTrainer) -> dict:
    try:
        return trainer.run()
    finally:
        trainer.close()


def _records(out_dir: Path) -> list[dict]:
    return read_metrics(out_dir / "metrics.jsonl")[1:]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.mode=async", "rollout.max_staleness=0", *OFF_POLICY], "rollout.max_staleness"),
        (["rollout.mode=one_step_off", "rollout.max_staleness=2", *OFF_POLICY], "rollout.max_staleness"),
        (["rollout.mode=one_step_off", "rollout.remote=false", *OFF_POLICY], "rollout.remote"),
        (["rollout.mode=async", "rollout.top_k=8", *OFF_POLICY], "rollout.top_k"),
        (["rollout.mode=async", "rollout.top_p=0.9", *OFF_POLICY], "rollout.top_p"),
        (["rollout.mode=one_step_off", "grpo.old_logprobs=recompute"], "grpo.old_logprobs"),
        (["rollout.partial_rollouts=true"], "rollout.partial_rollouts"),
        (["rollout.workers=2"], "rollout.workers"),
        (["rollout.mode=async", "rollout.workers=0", *OFF_POLICY], "rollout.workers"),
        (["rollout.mode=async", "rollout.segment_tokens=-1", *OFF_POLICY], "rollout.segment_tokens"),
        (["rollout.sync_warmup_steps=2"], "rollout.sync_warmup_steps"),
        (["rollout.mode=one_step_off", "rollout.sync_warmup_steps=-1", *OFF_POLICY], "rollout.sync_warmup_steps"),
    ],
)
def test_unsound_combinations_are_config_errors(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        _config(tmp_path, *overrides)


def test_off_policy_modes_default_to_a_worker_process(tmp_path):
    assert _config(tmp_path, "rollout.mode=one_step_off", *OFF_POLICY).rollout.is_remote
    assert not _config(tmp_path).rollout.is_remote
    recompute = _config(tmp_path, "rollout.mode=async", "grpo.rollout_correction=truncate")  # decoupled PPO
    assert recompute.rollout.max_staleness == 1


@pytest.mark.timeout(300)
def test_sync_mode_in_a_worker_trains_exactly_what_the_in_process_engine_trains(tmp_path):
    weights = {}
    for remote in (False, True):
        trainer = _trainer(tmp_path / str(remote), "grpo.steps=2", f"rollout.remote={str(remote).lower()}")
        _run(trainer)
        assert trainer.rollout_scheduler is None and getattr(trainer.rollout, "remote", False) is remote
        weights[remote] = trainer.model.state_dict()
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])
    volatile = ("time/", "rollout/tokens_per_s", "scheduler/latency_s")
    local, remote = ([{k: v for k, v in r.items() if not k.startswith(volatile)} for r in _records(tmp_path / str(m))]
                     for m in (False, True))  # fmt: skip
    assert local == remote


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("temperature", "workers"), [(1.0, 1), (0.7, 2)])
def test_one_step_off_trains_on_the_previous_versions_samples_with_their_log_probs(tmp_path, temperature, workers):
    """Each trained batch was sampled by the weights of the step before (staleness 1, 0 at the first step), and the
    loss's old log-probs are those weights' log-probs of the sampled tokens at the sampling temperature, not the
    current weights'. With two rollout workers, each samples its share of the prompts with the pushed weights."""
    steps = 4
    trainer = _trainer(tmp_path, f"grpo.steps={steps}", "rollout.mode=one_step_off", *OFF_POLICY,
                       f"grpo.temperature={temperature}", f"rollout.workers={workers}")  # fmt: skip
    versions: dict[int, dict] = {}  # version -> the trainer's weights of that version
    seen: list[tuple[int, list[torch.Tensor], object]] = []
    train_on_rollout, train_mini_batch = trainer.train_on_rollout, trainer._train_mini_batch

    def on_rollout(seqs, fields, step):
        versions[step] = copy.deepcopy(trainer.model.state_dict())  # the weights trained at `step` are version `step`
        return train_on_rollout(seqs, fields, step)

    def on_mini_batch(seqs, fields, index):
        seen.append((trainer.step, [fields["old"][i] for i in index], seqs))
        return train_mini_batch(seqs, fields, index)

    trainer.train_on_rollout, trainer._train_mini_batch = on_rollout, on_mini_batch
    _run(trainer)
    assert len(getattr(trainer.rollout, "engines", [trainer.rollout])) == workers
    records = _records(tmp_path)
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["rollout/staleness_mean"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["rollout/dropped_stale"] == 0.0 for r in records)

    model = PolicyModel(trainer.model.config).eval()
    moved = False
    for step, old, seqs in seen:
        behaviour = _logprobs(model, versions[max(step - 1, 0)], seqs, trainer.codec.pad_id, temperature)
        for got, want, mask in zip(old, behaviour, seqs.loss_mask, strict=True):
            torch.testing.assert_close(got[mask > 0], want[mask > 0], rtol=0, atol=2e-4)
        if step > 0:
            current = _logprobs(model, versions[step], seqs, trainer.codec.pad_id, temperature)
            moved |= any(
                (o - c)[m > 0].abs().max() > 1e-2 for o, c, m in zip(old, current, seqs.loss_mask, strict=True)
            )
    assert moved  # the check tells the sampling version from the trained one


def _logprobs(model: PolicyModel, weights: dict, seqs, pad_id: int, temperature: float) -> list[torch.Tensor]:
    """Per sequence, position-aligned: the log-probs of `seqs`' targets under `weights` at `temperature`."""
    model.load_state_dict(weights)
    batch, _ = pack(seqs, 64, pad_id=pad_id)
    tokens = loss_tokens(batch)
    with torch.no_grad():
        return per_sequence(batch, tokens, packed_logprobs(model, batch, tokens, temperature, "torch"), len(seqs))


@pytest.mark.timeout(300)
def test_async_never_trains_above_max_staleness(tmp_path):
    steps = 5
    _run(_trainer(tmp_path, f"grpo.steps={steps}", "rollout.mode=async", "rollout.max_staleness=2",
                  "grpo.old_logprobs=recompute", "grpo.rollout_correction=truncate"))  # fmt: skip
    records = _records(tmp_path)
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert all(r["loss/rollout_is_ratio_mean"] is not None for r in records)  # the decoupled-PPO correction ran


@pytest.mark.timeout(300)
def test_sync_warmup_steps_train_what_sync_trains_then_the_mode_looks_ahead(tmp_path):
    """async with two warm-up steps: those steps sample with the weights they train, through the same worker, and
    log exactly what sync mode logs; the mode's lookahead starts after them."""
    warmup, steps = 2, 5
    _run(_trainer(tmp_path / "sync", f"grpo.steps={warmup}", "rollout.remote=true", *OFF_POLICY))
    _run(_trainer(tmp_path / "async", f"grpo.steps={steps}", "rollout.mode=async", "rollout.max_staleness=2",
                  f"rollout.sync_warmup_steps={warmup}", *OFF_POLICY))  # fmt: skip
    sync, off = _records(tmp_path / "sync"), _records(tmp_path / "async")
    assert [r["rollout/staleness_max"] for r in off] == [0.0, 0.0, 0.0, 1.0, 2.0]
    volatile = ("time/", "rollout/", "scheduler/latency_s", "eval/")  # sync ran to its end: it evaluated
    for a, b in zip(sync, off[:warmup], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(volatile)} == {
            k: v for k, v in b.items() if not k.startswith(volatile)
        }
    assert off[warmup]["loss/ratio_mean"] != sync[-1]["loss/ratio_mean"]  # the compared fields move between steps


@pytest.mark.timeout(300)
def test_partial_rollouts_train_every_token_with_the_log_prob_of_the_version_that_sampled_it(tmp_path):
    """Async with partial rollouts: batches generate in segments and weights pushed meanwhile are loaded between
    them. The old log-probs are the sampler's, token by token, and each equals the log-prob under the weights of the
    version that token names; the staleness bound holds."""
    steps = 5
    trainer = _trainer(tmp_path, f"grpo.steps={steps}", "rollout.mode=async", "rollout.max_staleness=2",
                       "rollout.partial_rollouts=true", "rollout.segment_tokens=3", *OFF_POLICY)  # fmt: skip
    weights: dict[int, dict] = {}
    seen = []
    train_on_rollout = trainer.train_on_rollout

    def on_rollout(seqs, fields, step):
        weights[step] = copy.deepcopy(trainer.model.state_dict())
        seen.append((seqs, list(fields["old"]), trainer.rollout_scheduler.last.rollout))
        return train_on_rollout(seqs, fields, step)

    trainer.train_on_rollout = on_rollout
    _run(trainer)
    records = _records(tmp_path)
    assert all(r["rollout/staleness_max"] <= 2 for r in records)
    assert all(0.0 <= r["rollout/partial_frac"] <= 1.0 for r in records)

    model = PolicyModel(trainer.model.config).eval()
    for seqs, old, rollout in seen:
        assert len(seqs) == len(rollout)
        by_version = {v: _logprobs(model, weights[v], seqs, trainer.codec.pad_id, 1.0)
                      for v in {int(v) for t in rollout.versions for v in t}}  # fmt: skip
        for i, (got, mask) in enumerate(zip(old, seqs.loss_mask, strict=True)):
            got, tokens = got[mask > 0], rollout.versions[i]
            torch.testing.assert_close(got, rollout.logprobs[i], rtol=0, atol=0)  # the sampler's, unchanged
            for v, want in by_version.items():
                torch.testing.assert_close(got[tokens == v], want[i][mask > 0][tokens == v], rtol=0, atol=2e-4)


@pytest.mark.timeout(300)
def test_dynamic_sampling_in_async_mode_samples_its_extra_rounds_with_the_trained_weights(tmp_path):
    """DAPO's extra rounds in async mode are generated behind the batches in flight by the weights being trained
    (staleness 0); a step's groups mix the batch sampled ahead and fresh ones, every token trained with the log-prob
    it was sampled with."""
    trainer = _trainer(tmp_path, "grpo.steps=4", "rollout.mode=async", "rollout.max_staleness=2", *OFF_POLICY,
                       "dapo.dynamic_sampling=true", "dapo.max_sampling_rounds=3")  # fmt: skip
    extra_rounds, merged = [], {}
    roll_out, dynamic, train_on_rollout = trainer._roll_out, trainer._dynamic_sampling, trainer.train_on_rollout

    def on_roll_out(problems, step, round_=0):  # in async mode only the extra rounds come here
        prompts, rb, handle = roll_out(problems, step, round_)
        extra_rounds.append((step, {int(v) for t in rb.versions for v in t}))
        return prompts, rb, handle

    def on_dynamic(first, step):
        groups, metrics = dynamic(first, step)
        merged[step] = groups.rollout
        return groups, metrics

    def on_rollout(seqs, fields, step):
        for got, mask, lp in zip(fields["old"], seqs.loss_mask, merged[step].logprobs, strict=True):
            torch.testing.assert_close(got[mask > 0], lp, rtol=0, atol=0)  # the sampler's log-probs, every round
        return train_on_rollout(seqs, fields, step)

    trainer._roll_out, trainer._dynamic_sampling, trainer.train_on_rollout = on_roll_out, on_dynamic, on_rollout
    _run(trainer)
    records = _records(tmp_path)
    assert all(r["rollout/staleness_max"] <= 2 for r in records)
    assert extra_rounds and all(versions == {step} for step, versions in extra_rounds)
    assert sum(r["dynamic_sampling/rounds"] for r in records) == len(records) + len(extra_rounds)


@pytest.mark.timeout(120)
def test_a_batch_staler_than_the_bound_is_dropped_and_sampled_again(tmp_path):
    """The scheduler with a lookahead beyond its bound (which the trainer never sets): the batches sampled two
    versions back are dropped and sampled again with the newest weights."""
    torch.manual_seed(0)
    model = PolicyModel(PolicyConfig.tiny(max_position_embeddings=128)).eval()
    with RemoteRolloutEngine("native", model=model, num_threads=1) as engine:
        sched = RolloutScheduler(
            engine, lookahead=2, max_staleness=1, take=lambda step: [step, step + 1], encode=lambda p: [1, 5 + p, 6],
            sampling=lambda step: dict(n=2, max_new_tokens=6, seed=step), score=lambda problems, rb, step: None,
            stream_state=lambda: 0, last_step=5,
        )  # fmt: skip
        trained = []
        for step in range(5):
            entry = sched.next(step, version=step)
            trained.append((entry.staleness, entry.regenerated, {int(v) for t in entry.rollout.versions for v in t}))
            with torch.no_grad():
                for _, t in model.named_weights():
                    t.add_(0.01)
            sched.after_step(model, version=step + 1)
    assert all(s <= 1 for s, _, _ in trained)
    assert sched.stats.dropped_stale >= 1
    assert any(regen and vs == {step} for step, (_, regen, vs) in enumerate(trained))


def _prompts_trained(trainer: GRPOTrainer, into: list[list[str]]) -> None:
    train_on_rollout = trainer.train_on_rollout

    def record(seqs, fields, step):
        into.append([p.prompt for p in trainer.rollout_scheduler.last.problems])
        return train_on_rollout(seqs, fields, step)

    trainer.train_on_rollout = record


KILL_RUN = ["grpo.steps=5", "rollout.mode=async", "rollout.max_staleness=2", "checkpoint.every=2", *OFF_POLICY]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[list[str]]:
    """The prompts of each step of an uninterrupted `KILL_RUN`."""
    prompts: list[list[str]] = []
    trainer = _trainer(tmp_path_factory.mktemp("straight"), *KILL_RUN)
    _prompts_trained(trainer, prompts)
    _run(trainer)
    return prompts


@pytest.mark.timeout(400)
def test_kill9_of_the_worker_stops_the_run_and_the_resumed_run_neither_loses_nor_repeats_prompts(tmp_path, straight):
    common = KILL_RUN
    out = tmp_path / "killed"
    killed: list[list[str]] = []
    trainer = _trainer(out, *common)
    _prompts_trained(trainer, killed)
    train_on_rollout = trainer.train_on_rollout

    def kill_at_step_3(seqs, fields, step):  # batches of steps 3 and 4 are in flight, the step-2 checkpoint exists
        if step == 2:
            os.kill(trainer.rollout.pid, signal.SIGKILL)
        return train_on_rollout(seqs, fields, step)

    trainer.train_on_rollout = kill_at_step_3
    with pytest.raises(RolloutProcessLost, match=r"killed by SIGKILL.*step-000002.*resume") as info:
        _run(trainer)
    assert "\n" not in str(info.value)
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"

    resumed = _trainer(out, *common)
    _prompts_trained(resumed, killed)
    _run(resumed)
    assert len(straight) == 5 and killed[:2] + killed[3:] == straight  # the killed run's step 3 is done again
    assert killed[2] == straight[2]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[3]["rollout/staleness_max"] == 0.0  # the resumed run's first batch: sampled by the resumed weights


class _Stop(Exception):
    """Raised by a test inside a run, after a checkpoint."""


def _numbered_takes(trainer: GRPOTrainer, takes: list[tuple[int, bool, list[int]]], trained: list[list[int]]):
    """Record each take from the data stream (the trainer's step, out of order or not, the stream numbers) and the
    numbers of each step's trained problems (dynamic sampling's chosen groups)."""
    numbered: dict[int, tuple[object, int]] = {}  # id -> (the problem, kept alive; its number)
    take, dynamic = trainer.stream.take, trainer._dynamic_sampling

    def numbered_take(n, out_of_order=False):
        problems = take(n, out_of_order=out_of_order)
        numbers = trainer.stream.last_numbers
        numbered.update({id(p): (p, i) for p, i in zip(problems, numbers, strict=True)})
        takes.append((trainer.step, out_of_order, list(numbers)))
        return problems

    def on_dynamic(first, step):
        groups, metrics = dynamic(first, step)
        trained.append(sorted(numbered[id(p)][1] for p in groups.problems))
        return groups, metrics

    trainer.stream.take, trainer._dynamic_sampling = numbered_take, on_dynamic


@pytest.mark.timeout(400)
def test_dynamic_sampling_in_async_mode_resumes_without_taking_a_problem_twice(tmp_path):
    """DAPO's extra rounds of the steps before a checkpoint were taken behind the batches in flight, past the saved
    data position: the resumed run takes the batches in flight again and passes over those extra rounds (their
    problems were trained or, their groups all alike, dropped: either way used, as in sync mode)."""
    run = ["grpo.steps=5", "rollout.mode=async", "rollout.max_staleness=2", "checkpoint.every=2", *OFF_POLICY,
           "dapo.dynamic_sampling=true", "dapo.max_sampling_rounds=3"]  # fmt: skip
    out = tmp_path / "run"
    takes, trained = [], []
    trainer = _trainer(out, *run)
    _numbered_takes(trainer, takes, trained)
    saved, checkpoint_state = [], trainer.stream.checkpoint_state
    trainer.stream.checkpoint_state = lambda position: saved.append(checkpoint_state(position)) or saved[-1]
    train_on_rollout = trainer.train_on_rollout

    def stop_in_step_3(seqs, fields, step):
        if step == 2:
            raise _Stop
        return train_on_rollout(seqs, fields, step)

    trainer.train_on_rollout = stop_in_step_3
    with pytest.raises(_Stop):
        _run(trainer)
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    position = saved[-1]
    used = {i for step, out_of_order, numbers in takes if out_of_order and step < 2 for i in numbers}
    assert used and min(used) >= position["count"] and used <= set(position["pass_over"])

    resumed_takes, resumed_trained = [], []
    resumed = _trainer(out, *run)
    _numbered_takes(resumed, resumed_takes, resumed_trained)
    _run(resumed)
    taken = [i for _, _, numbers in resumed_takes for i in numbers]
    assert taken[0] == position["count"]  # the batches that were in flight come again
    assert not used & set(taken)  # the extra rounds trained before the checkpoint do not
    assert set(range(position["count"], max(taken) + 1)) - used <= set(taken)  # nothing else is skipped
    every = [i for step in trained[:2] + resumed_trained for i in step]
    assert len(resumed_trained) == 3 and len(every) == len(set(every))


KILLED_TRAINER = r"""
import json, os, signal, sys
from pathlib import Path

from r1engine.trainer.config import load_config
from r1engine.trainer.grpo import GRPOTrainer

if __name__ == "__main__":  # the rollout worker is spawned: it re-imports this script
    log = Path(sys.argv[1])
    trainer = GRPOTrainer(load_config(sys.argv[2], sys.argv[3:]), progress=False)
    train_on_rollout = trainer.train_on_rollout

    def record(seqs, fields, step):
        with log.open("a") as f:
            if step == 2:  # the step-2 checkpoint exists, the batches of steps 3 and 4 are in flight
                f.write(json.dumps({"worker": trainer.rollout.pid}) + "\n")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(json.dumps([p.prompt for p in trainer.rollout_scheduler.last.problems]) + "\n")
        return train_on_rollout(seqs, fields, step)

    trainer.train_on_rollout = record
    trainer.run()
"""


@pytest.mark.timeout(400)
def test_kill9_of_the_trainer_takes_its_worker_down_and_the_rerun_neither_loses_nor_repeats_prompts(tmp_path, straight):
    import json

    import psutil

    out, log, script = tmp_path / "killed", tmp_path / "trained.jsonl", tmp_path / "killed_trainer.py"
    script.write_text(KILLED_TRAINER)
    overrides = [f"output_dir={out}", *TINY, *KILL_RUN]
    result = subprocess.run([sys.executable, str(script), str(log), str(ROOT / "configs" / "demo.yaml"), *overrides],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    *before, worker = [json.loads(line) for line in log.read_text().splitlines()]
    deadline = time.monotonic() + 10  # the orphaned worker sees its parent gone and exits
    while psutil.pid_exists(worker["worker"]) and psutil.Process(worker["worker"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the rollout worker outlived its killed trainer"
        time.sleep(0.2)

    after: list[list[str]] = []
    resumed = _trainer(out, *KILL_RUN)
    _prompts_trained(resumed, after)
    _run(resumed)
    assert before + after == straight  # steps 1-2 before the kill, 3-5 after the resume from step-000002


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_deepspeed_ranks_each_with_its_rollout_worker_train_async_and_resume(tmp_path):
    """`--nproc 2` with ZeRO-2 in async mode: each rank drives a worker of its own (its share of the prompts), the
    staleness bound holds, and a rerun with more steps resumes from the checkpoint and fills its pipeline again."""
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "r1engine.cli", "train", "--nproc=2", "--no-progress", "--config",
           str(ROOT / "configs" / "demo.yaml"), f"output_dir={tmp_path}", *TINY, "training.deepspeed_zero_stage=2",
           "rollout.mode=async", "rollout.max_staleness=2", *OFF_POLICY, "checkpoint.every=2"]  # fmt: skip
    for steps in (4, 6):
        result = subprocess.run([*cmd, f"grpo.steps={steps}"], cwd=ROOT, capture_output=True, text=True, timeout=500)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "rollout/staleness_max" in r]
    assert [(r["step"], r["rollout/staleness_max"]) for r in records] == [
        (1, 0.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 0.0), (6, 1.0)
    ]  # fmt: skip
