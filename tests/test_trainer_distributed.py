"""The whole trainer on 2 data-parallel ranks (real processes started by `r1engine train --nproc 2`, gloo,
DeepSpeed ZeRO-3 on CPU): one metrics log, a checkpoint holding every rank's state, and a resume that continues
where the run stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.trainer.metrics import read_metrics

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.preset=tiny", "task.max_digits=2", "task.num_eval=8", "sft.steps=4", "sft.batch_size=8",
    "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.mini_batches=2", "grpo.max_new_tokens=24",
    "grpo.lr=1.0e-3", "grpo.beta=0.01", "training.chunk_len=64", "training.num_threads=1", "eval.every=1",
    "checkpoint.every=1", "checkpoint.keep=3", "rollout.backend=native",
]  # fmt: skip


def _train(out_dir: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "r1engine.cli", "train", f"--nproc={nproc}", "--no-progress",
           "--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={out_dir}", *TINY, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(600)
def test_two_ranks_zero3_train_checkpoint_and_resume(tmp_path):
    pytest.importorskip("deepspeed")
    first = _train(tmp_path, "grpo.steps=2", "training.deepspeed_zero_stage=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count('"accuracy_after_rl"') == 1  # only rank 0 reports

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # rank 0 alone writes the log
    for r in records:
        assert 0.0 <= r["eval/accuracy"] <= 1.0
    for r in records[1:]:
        assert 0.0 <= r["reward/mean"] <= 2.0 and r["loss/grad_norm"] > 0

    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000002"
    step2 = ckpt / "step-000002"
    for rank in (0, 1):
        assert (step2 / f"rng-rank{rank}.pt").is_file()
        assert (step2 / "deepspeed" / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    assert torch.load(step2 / "trainer.pt", weights_only=False)["world_size"] == 2
    assert not list(ckpt.glob("*.tmp"))
    w1 = PolicyModel.from_pretrained(ckpt / "step-000001" / "model").state_dict()
    w2 = PolicyModel.from_pretrained(step2 / "model").state_dict()  # full weights, gathered from the partitions
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "a GRPO step on 2 ranks left the weights unchanged"

    resumed = _train(tmp_path, "grpo.steps=3", "training.deepspeed_zero_stage=3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "held-out at resume" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (ckpt / "latest").read_text() == "step-000003"

    other_world = _train(tmp_path, "grpo.steps=4", "training.deepspeed_zero_stage=3", nproc=1)
    assert other_world.returncode != 0
    assert "written by 2 ranks" in other_world.stderr


def test_several_ranks_need_a_zero_stage(tmp_path):
    result = _train(tmp_path, "grpo.steps=1")
    assert result.returncode == 2
    assert "training.deepspeed_zero_stage" in result.stderr
