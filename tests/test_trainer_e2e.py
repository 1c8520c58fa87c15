"""End-to-end GRPO runs on CPU: a short run moves rewards, loss and weights and writes its metrics, plot and
checkpoints; a run killed with SIGKILL resumes from its checkpoint and logs exactly the metrics of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.trainer.config import load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics

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
    "rewards.weights={arithmetic: 1.0, format: 1.0}",
    "eval.every=1",
]


def _run(out_dir: Path, *extra: str) -> dict:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={out_dir}", *TINY, *extra])
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        return trainer.run()
    finally:
        trainer.close()


@pytest.mark.timeout(600)
def test_short_run_moves_rewards_loss_and_weights(tmp_path):
    summary = _run(tmp_path, "grpo.steps=3", "checkpoint.every=1", "checkpoint.keep=3", "rollout.backend=native")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["eval/accuracy"] == summary["accuracy_before_rl"]
    for r in records[1:]:
        assert 0.0 <= r["reward/mean"] <= 2.0
        assert {"reward/arithmetic/mean", "reward/format/mean", "loss/policy", "loss/clip_frac", "loss/kl_mean",
                "rollout/response_len_mean", "rollout/acceptance_rate", "time/rollout_s", "packing/padding_frac",
                "eval/accuracy"} <= r.keys()  # fmt: skip
        assert all(v is None or v == v for v in r.values())  # no NaN slipped through (NaN is logged as null)
    assert len({r["loss/policy"] for r in records[1:]}) > 1  # the loss moves
    assert any(r["loss/kl_mean"] > 0 for r in records[2:])  # the policy leaves the reference
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    # weights move between consecutive checkpoints, and checkpoints load as models
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000001", "step-000002", "step-000003"]
    first, last = (PolicyModel.from_pretrained(c / "model").state_dict() for c in (ckpts[0], ckpts[-1]))
    moved = [k for k in first if not torch.equal(first[k], last[k])]
    assert "lm_head.weight" in moved and any("mtp_layers" in k for k in moved)


@pytest.mark.timeout(300)
def test_sampler_log_probs_are_the_old_policy(tmp_path):
    """With the rollout engine's log-probs as the old policy, one on-policy mini-batch sees ratios of 1: the
    engine samples from exactly the weights being trained (sync after every step)."""
    _run(tmp_path, "grpo.steps=2", "grpo.mini_batches=1", "grpo.old_logprobs=sampler", "rollout.backend=native",
         "checkpoint.every=0", "training.device=cpu", "rollout.device=cpu")  # fmt: skip
    records = read_metrics(tmp_path / "metrics.jsonl")[1:]
    assert len(records) == 2
    for r in records:
        assert r["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and r["loss/clip_frac"] == 0.0
        assert r["rollout/sampler_vs_trainer_logprob_absdiff"] is None  # nothing recomputed to compare with


def _cli(out_dir: Path, steps: int) -> list[str]:
    overrides = [f"output_dir={out_dir}", *TINY, f"grpo.steps={steps}", "checkpoint.every=2",
                 "rollout.backend=native", "training.deterministic=true"]  # fmt: skip
    return [sys.executable, "-m", "r1engine.cli", "train", "--config", str(ROOT / "configs/demo.yaml"),
            "--no-progress", *overrides]  # fmt: skip


def _comparable(records: list[dict]) -> list[dict]:
    """Drop what legitimately differs between runs: wall-clock times and rates."""
    volatile = ("time/", "rollout/tokens_per_s", "scheduler/latency_s")
    return [{k: v for k, v in r.items() if not k.startswith(volatile)} for r in records]


@pytest.mark.timeout(900)
def test_resume_after_kill9_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(straight, 4), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cli(killed, 4), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:  # kill once step 3 is logged: the step-2 checkpoint exists, step 3 is lost
        if metrics.exists() and any(json.loads(line)["step"] == 3 for line in metrics.read_text().splitlines()):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text() == "step-000002"

    subprocess.run(_cli(killed, 4), check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert _comparable(read_metrics(killed / "metrics.jsonl")) == _comparable(read_metrics(straight / "metrics.jsonl"))
    a = PolicyModel.from_pretrained(straight / "checkpoints" / "step-000004" / "model").state_dict()
    b = PolicyModel.from_pretrained(killed / "checkpoints" / "step-000004" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_short_run_through_vllm_keeps_rollout_weights_in_sync(tmp_path):
    """Rollouts through a real vllm.LLM with MTP speculation: after every live weight sync the sampler's
    log-probs of the sampled tokens equal the trainer's own (so vLLM really runs the updated policy)."""
    pytest.importorskip("vllm")
    _run(tmp_path, "grpo.steps=3", "checkpoint.every=0", "rollout.backend=vllm", "rollout.num_speculative_tokens=1")
    records = read_metrics(tmp_path / "metrics.jsonl")[1:]
    assert len(records) == 3
    for r in records:
        assert r["rollout/sampler_vs_trainer_logprob_absdiff"] < 1e-3, r
        # drafts were made and scored (a step without drafts logs NaN as null); a 4-step-SFT drafter may
        # legitimately have every draft rejected, so the rate itself is only range-checked
        assert r["rollout/acceptance_rate"] is not None and 0.0 <= r["rollout/acceptance_rate"] <= 1.0
    assert records[0]["loss/policy"] != records[-1]["loss/policy"]
