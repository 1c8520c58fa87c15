"""A rollout worker started on its own (`r1engine rollout-worker --connect`), the placement of a trainer and its
rollouts on separate machines, run here as separate local processes over TCP.

Real processes throughout: the worker is the CLI in a subprocess, the trainer either a `RemoteRolloutEngine` with
`listen=` in this process or `r1engine train` in another subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.rollout.external import AUTHKEY_ENV, format_address
from r1engine.rollout.pool import RolloutPool
from r1engine.rollout.remote import RemoteRolloutEngine, RolloutWorkerDied
from r1engine.trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.preset=tiny", "task.max_digits=2", "task.num_eval=8", "sft.steps=4", "sft.batch_size=8",
    "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24", "grpo.lr=1.0e-3",
    "training.chunk_len=64", "training.num_threads=1", "rollout.backend=native", "rollout.num_threads=1",
    "rewards.weights={arithmetic: 1.0, format: 1.0}", "eval.every=100", "checkpoint.every=0",
]  # fmt: skip


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker(address: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r1engine.cli", "rollout-worker", "--connect", address, "--num-threads", "1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@contextlib.contextmanager
def _running_worker(*args: str, env: dict | None = None, host: str = "127.0.0.1"):
    """(address, worker process) of a `r1engine rollout-worker` connecting to a free local port; killed at exit."""
    address = format_address(host, _free_port(host))
    worker = _worker(address, *args, env=env)
    try:
        yield address, worker
    finally:
        worker.kill()
        worker.communicate()


def _engine(model: PolicyModel, address: str) -> RemoteRolloutEngine:
    return RemoteRolloutEngine("native", model=model, listen=address, num_speculative_tokens=0, start_timeout_s=60)


@torch.no_grad()
def _assert_sampled_by(model: PolicyModel, batch) -> None:
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs, strict=True):
        logits = model(torch.tensor([p + c]), compute_logits=True).logits[0, len(p) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(lp, want, rtol=0, atol=2e-4)


@pytest.mark.timeout(180)
def test_a_worker_started_elsewhere_takes_the_trainers_weights_and_dies_visibly(policy, monkeypatch):
    """The worker builds its engine from its own copy (m0) and takes the trainer's weights (m1) at once; a push
    reaches it over the group; kill -9 of the worker is seen at the next wait."""
    m0, path, m1 = policy
    monkeypatch.setenv(AUTHKEY_ENV, "a shared secret")
    # the worker starts first: the trainer is late, and the worker waits for it
    with (
        _running_worker("--model-dir", str(path), env=dict(os.environ)) as (address, worker),
        _engine(m1, address) as engine,
    ):
        assert engine.version == 0 and engine.last_sync["bytes"] > 0
        kw = dict(n=2, max_new_tokens=10, temperature=1.0, seed=0)
        _assert_sampled_by(m1, engine.generate([[1, 5, 6, 7], [1, 9, 8]], **kw))
        engine.push_weights(m0, version=1)
        batch = engine.generate([[1, 5, 6, 7]], **kw)
        assert {int(v) for t in batch.versions for v in t} == {1}
        _assert_sampled_by(m0, batch)
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        with pytest.raises(RolloutWorkerDied, match="died"):
            engine.generate([[1, 5]], max_new_tokens=4)


@pytest.mark.timeout(180)
def test_a_pool_of_workers_started_elsewhere_takes_the_trainers_weights_in_one_broadcast(policy):
    """Two workers, each connecting to its own port, build their engines from their copy (m0); the pool sends them
    the trainer's weights (m1) over their one group at once, and a later push reaches both."""
    m0, path, m1 = policy
    with (
        _running_worker("--model-dir", str(path)) as (first, _),
        _running_worker("--model-dir", str(path)) as (second, _),
    ):
        addresses = [first, second]

        def make(w: int, group) -> RemoteRolloutEngine:
            return RemoteRolloutEngine("native", model=m1, listen=addresses[w], group=group, rank=w + 1,
                                       num_speculative_tokens=0, start_timeout_s=60)  # fmt: skip

        with RolloutPool.start(2, make, model=m1) as pool:
            assert pool.version == 0 and pool.last_sync["workers"] == 2 and pool.last_sync["bytes"] > 0
            prompts = [[1, 5, 6, 7], [1, 9, 8], [1, 4], [1, 7, 7]]
            kw = dict(n=2, max_new_tokens=10, temperature=1.0, seed=0)
            _assert_sampled_by(m1, pool.generate(prompts, **kw))
            pool.push_weights(m0, version=1)
            batch = pool.generate(prompts, **kw)
            assert {int(v) for t in batch.versions for v in t} == {1}
            _assert_sampled_by(m0, batch)


@pytest.mark.timeout(120)
def test_a_pool_whose_second_worker_never_connects_fails_naming_that_worker(policy):
    """The first worker waits in the weight group for the second, which never comes: the error is the second's
    (nobody connected to its port), not the first's wait."""
    _, path, m1 = policy
    with _running_worker("--model-dir", str(path)) as (first, worker):
        addresses = [first, format_address("127.0.0.1", _free_port())]

        def make(w: int, group) -> RemoteRolloutEngine:
            return RemoteRolloutEngine("native", model=m1, listen=addresses[w], group=group, rank=w + 1,
                                       num_speculative_tokens=0, start_timeout_s=8)  # fmt: skip

        with pytest.raises(TimeoutError, match=f"no rollout worker connected to {addresses[1]}"):
            RolloutPool.start(2, make, model=m1, timeout_s=4)
        worker.wait(30)  # the started worker is gone too (its wait for the group timed out)


@pytest.mark.timeout(120)
def test_the_worker_exits_when_its_trainer_closes(policy):
    _, path, m1 = policy
    with _running_worker("--model-dir", str(path)) as (address, worker):
        with _engine(m1, address):
            pass
        assert worker.wait(30) == 0


def _has_ipv6_loopback() -> bool:
    try:
        _free_port("::1")
    except OSError:
        return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_address_carries_requests_and_weights(policy):
    _, path, m1 = policy
    with _running_worker("--model-dir", str(path), host="::1") as (address, worker), _engine(m1, address) as engine:
        assert address.startswith("[::1]:")
        _assert_sampled_by(m1, engine.generate([[1, 5, 6, 7]], n=2, max_new_tokens=8, seed=0))


@pytest.mark.timeout(120)
def test_a_worker_without_the_model_directory_fails_the_trainers_start_with_the_reason(policy, tmp_path):
    _, _, m1 = policy
    with _running_worker("--model-dir", str(tmp_path / "absent")) as (address, worker):
        with pytest.raises(FileNotFoundError, match="--model-dir"):
            _engine(m1, address)
        assert worker.wait(30) == 0  # it reported the error and was closed


@pytest.mark.timeout(120)
def test_a_worker_with_another_key_is_refused_and_says_so(policy, monkeypatch):
    _, path, m1 = policy
    monkeypatch.setenv(AUTHKEY_ENV, "the trainer's secret")
    env = dict(os.environ, **{AUTHKEY_ENV: "another secret"})
    with _running_worker("--model-dir", str(path), env=env) as (address, worker):
        with pytest.raises(ConnectionError, match="handshake"):
            _engine(m1, address)
        _, err = worker.communicate(timeout=30)
        assert worker.returncode == 2
        assert err.strip().startswith("r1engine: rollout-worker error:") and len(err.strip().splitlines()) == 1


def test_a_worker_without_a_trainer_gives_up_with_one_line():
    worker = _worker(f"127.0.0.1:{_free_port()}", "--connect-timeout", "1")
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 2
    assert err.strip() == f"r1engine: rollout-worker error: no trainer listening on {worker.args[5]} within 1 s"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.mode=one_step_off", "grpo.old_logprobs=sampler", "rollout.listen=localhost"], "host:port"),
        (["rollout.mode=one_step_off", "grpo.old_logprobs=sampler", "rollout.listen=10.0.0.1:29600"], AUTHKEY_ENV),
        (["rollout.listen=127.0.0.1:29600"], "rollout.remote=true"),
    ],
)
def test_bad_listen_settings_are_config_errors(tmp_path, monkeypatch, overrides, match):
    monkeypatch.delenv(AUTHKEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"^rollout.listen.*{match}"):
        load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", *TINY, *overrides])


@pytest.mark.timeout(400)
def test_trainer_and_worker_as_two_launched_processes_train_one_step_off(tmp_path):
    """`r1engine train ... rollout.listen=` and `r1engine rollout-worker --connect`, each its own process (as on
    two machines): the run completes, every batch after the first one policy version stale."""
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "r1engine.cli", "train", "--config", "configs/demo.yaml", "--no-progress",
         f"output_dir={out}", *TINY, "grpo.steps=3", "rollout.mode=one_step_off", "grpo.old_logprobs=sampler",
         f"rollout.listen={address}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = _worker(address)  # no --model-dir: the directory the trainer wrote its model to (the same machine)
    try:
        _, terr = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, terr[-2000:]
        assert worker.wait(30) == 0
    finally:
        for p in (trainer, worker):
            p.kill()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 1.0]
