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


def test_a_new_log_never_truncates_a_previous_runs_metrics(tmp_path):
    """Issue 17 item 11: MetricsLogger(resume_step=None) used to unlink metrics.jsonl (61 lines to 3)."""
    path = tmp_path / "metrics.jsonl"
    _write(path, range(61))
    before = path.read_text()
    with pytest.raises(FileExistsError, match="metrics of a previous run"):
        MetricsLogger(tmp_path)
    assert path.read_text() == before
    path.write_text("")  # an empty file holds no history: a new log starts in it
    MetricsLogger(tmp_path).log(0, {"reward/mean": 0.0})
    assert [r["step"] for r in read_metrics(path)] == [0]


def test_resuming_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(61))
    MetricsLogger(tmp_path, resume_step=40)
    assert [r["step"] for r in read_metrics(path)] == list(range(41))
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
