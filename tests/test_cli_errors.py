"""`r1engine train` errors (issue 17 item 9): one line on stderr naming the key and the value, exit code 2, no
traceback, for an output_dir that cannot be written, a model.path / model.init_from that does not exist, and an
output_dir holding a previous run that cannot be resumed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOY = ["model.preset=tiny", "task.num_eval=4", "sft.steps=0", "grpo.steps=1", "training.num_threads=1",
       "rollout.backend=native", "rewards.num_workers=1"]  # fmt: skip


def _train(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "r1engine.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--no-progress", *TOY, *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.timeout(300)
def test_an_output_dir_under_a_regular_file(tmp_path):
    """Used to be `model error: [Errno 20] Not a directory: ...` (tests may run as root: a read-only directory
    would not stop the writes, a path under a regular file does)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    line = _one_error_line(_train(f"output_dir={out}"))
    assert line.startswith("r1engine: config error: output_dir: ")
    assert repr(str(out)) in line and f"{str(blocker)!r} is a file, not a directory" in line


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key", ["model.path", "model.init_from"])
def test_a_model_that_does_not_exist(tmp_path, key):
    missing = tmp_path / "no-such-model"
    line = _one_error_line(_train(f"output_dir={tmp_path / 'run'}", f"{key}={missing}"))
    assert line.startswith(f"r1engine: config error: {key}: ")
    assert repr(str(missing)) in line and "does not exist" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.timeout(300)
def test_a_previous_run_without_a_checkpoint_to_resume_from(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    metrics = '{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "eval/accuracy": 0.6}\n'
    (out / "metrics.jsonl").write_text(metrics)
    proc = _train(f"output_dir={out}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("r1engine:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"r1engine: checkpoint error: output_dir {str(out)!r} holds a previous run")
    assert "checkpoint.resume=false" in errors[0] and "another output_dir" in errors[0]
    assert (out / "metrics.jsonl").read_text() == metrics  # untouched
