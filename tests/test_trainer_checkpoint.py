"""Atomic checkpoints: a crash mid-save never leaves a corrupt `latest`, and old checkpoints are pruned."""

from __future__ import annotations

import pytest
import torch

from r1engine.trainer.checkpoint import CheckpointManager, rng_state, set_rng_state


def _writer(value: float):
    def write(directory):
        (directory / "model").mkdir()
        torch.save({"w": torch.full((3,), value)}, directory / "model" / "w.pt")

    return write


def test_save_load_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        mgr.save(step, _writer(float(step)), {"step": step})
    path, state = mgr.load()
    assert state["step"] == 3 and path.name == "step-000003"
    assert torch.load(path / "model" / "w.pt")["w"].tolist() == [3.0, 3.0, 3.0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _writer(1.0), {"step": 1})

    def crashing(directory):
        (directory / "partial").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crashing, {"step": 2})
    path, state = mgr.load()
    assert state["step"] == 1 and path.name == "step-000001"
    mgr.save(3, _writer(3.0), {"step": 3})  # the half-written directory is cleaned up by the next save
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(4)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(4))


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
