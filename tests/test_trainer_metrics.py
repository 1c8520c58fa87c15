"""metrics.jsonl survives a crash in the middle of a write: resuming keeps the records up to the checkpoint."""

from __future__ import annotations

import json

import pytest

from r1engine.trainer.metrics import MetricsLogger, read_metrics


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in steps) + tail)


def test_a_cut_last_line_is_left_out_and_resume_keeps_the_rest(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write(path, [0, 1, 2, 3], tail='{"step": 4, "reward/me')
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert "line 5 is cut short" in caplog.text
    logger = MetricsLogger(tmp_path, resume_step=2)
    logger.log(3, {"reward/mean": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]  # resumed twice: still readable
    MetricsLogger(tmp_path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


def test_a_damaged_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_metrics(path)
