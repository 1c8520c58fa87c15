"""Atomic checkpoints: a crash mid-save never leaves a corrupt `latest`, old checkpoints are pruned, and a damaged
checkpoint (or `latest` pointer) makes a resume fall back to the newest intact one, never to a silent restart."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from r1engine.trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    DamagedCheckpoint,
    rng_state,
    set_rng_state,
)


def _writer(value: float):
    """What the trainer writes into a checkpoint: model/ (config.json + safetensors), rank 0's RNG state and, as
    under DeepSpeed, the engine's own shards (torch.save files in a subdirectory)."""

    def write(directory):
        (directory / "model").mkdir()
        (directory / "model" / "config.json").write_text(json.dumps({"value": value}))
        save_file({"w": torch.full((64,), value)}, str(directory / "model" / "model.safetensors"))
        torch.save(rng_state(), directory / "rng-rank0.pt")
        (directory / "deepspeed" / "ds").mkdir(parents=True)
        torch.save({"optimizer": torch.full((64,), value)}, directory / "deepspeed" / "ds" / "optim_states.pt")

    return write


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))["w"]


def _three(tmp_path, keep=3):
    mgr = CheckpointManager(tmp_path, keep=keep)
    for step in (1, 2, 3):
        mgr.save(step, _writer(float(step)), {"step": step, "world_size": 1})
    return mgr


def test_save_load_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        mgr.save(step, _writer(float(step)), {"step": step})
    path, state = mgr.load()
    assert state["step"] == 3 and path.name == "step-000003"
    assert _weights(path).tolist() == [3.0] * 64
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


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


# Ways the newest checkpoint gets damaged (a disk filling up, a copy cut short, a stray edit), and the problem the
# warning must name.
DAMAGE = {
    "truncated safetensors": (lambda d: _truncate(d / "model" / "model.safetensors"), "model.safetensors is cut short"),
    "safetensors header garbage": (
        lambda d: (d / "model" / "model.safetensors").write_bytes(b"\xff" * 64),
        "model.safetensors is damaged",
    ),
    "missing safetensors": (lambda d: (d / "model" / "model.safetensors").unlink(), "model/ holds no weights"),
    "missing config.json": (lambda d: (d / "model" / "config.json").unlink(), "model/config.json is missing"),
    "garbage config.json": (
        lambda d: (d / "model" / "config.json").write_text('{"value": 3'),
        "model/config.json is not valid JSON",
    ),
    "missing RNG file": (lambda d: (d / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "truncated RNG file": (lambda d: _truncate(d / "rng-rank0.pt"), "rng-rank0.pt is damaged"),
    "missing trainer.pt": (lambda d: (d / "trainer.pt").unlink(), "trainer.pt is missing"),
    "truncated trainer.pt": (lambda d: _truncate(d / "trainer.pt"), "trainer.pt is damaged"),
    "truncated DeepSpeed shard": (
        lambda d: _truncate(d / "deepspeed" / "ds" / "optim_states.pt"),
        "deepspeed/ds/optim_states.pt is damaged",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, damage):
    mgr = _three(tmp_path)
    root = tmp_path / "checkpoints"
    hurt, problem = DAMAGE[damage]
    hurt(root / "step-000003")
    with pytest.raises(DamagedCheckpoint, match=problem):
        mgr.verify(root / "step-000003") if damage != "truncated trainer.pt" else mgr.read_state(root / "step-000003")
    assert mgr.latest().name == "step-000002"  # what `r1engine export RUN_DIR` reads

    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        path, state, _ = mgr.resume()
    assert path.name == "step-000002" and state["step"] == 2
    assert problem in caplog.text and "step-000003" in caplog.text
    # the damaged checkpoint is kept, renamed so that the resumed run cannot write over it; `latest` follows
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001", "step-000002", "step-000003.damaged"]
    assert (root / "latest").read_text() == "step-000002"
    # the run goes on: step 3 is written again, the damaged copy is never pruned or replaced
    mgr.save(3, _writer(30.0), {"step": 3, "world_size": 1})
    mgr.save(4, _writer(40.0), {"step": 4, "world_size": 1})
    assert sorted(p.name for p in root.glob("step-*")) == [
        "step-000002", "step-000003", "step-000003.damaged", "step-000004"
    ]  # fmt: skip
    assert _weights(root / "step-000003").tolist() == [30.0] * 64


def test_damage_found_only_by_the_reader_falls_back_too(tmp_path, caplog):
    """A checkpoint whose files look fine but do not load (here: the trainer's reader rejects it) is damaged too."""
    mgr = _three(tmp_path)

    def read(path, state):
        if state["step"] == 3:
            raise RuntimeError("tensor 'w' has the wrong shape")
        return _weights(path)

    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        path, state, weights = mgr.resume(read)
    assert path.name == "step-000002" and weights.tolist() == [2.0] * 64
    assert "RuntimeError: tensor 'w' has the wrong shape" in caplog.text
    assert (tmp_path / "checkpoints" / "step-000003.damaged").is_dir()


def test_a_reader_checkpoint_error_stops_the_search(tmp_path):
    """A checkpoint that does not fit the run (another number of ranks) is not damage: nothing is set aside."""
    mgr = _three(tmp_path)

    def read(path, state):
        raise CheckpointError(f"checkpoint {path} was written by 2 ranks, this run has 1")

    with pytest.raises(CheckpointError, match="2 ranks"):
        mgr.resume(read)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002", "step-000003"
    ]  # fmt: skip


def test_every_rank_must_have_its_rng_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, _writer(1.0), {"step": 1, "world_size": 2})  # only rank 0's RNG file is written here
    with pytest.raises(DamagedCheckpoint, match=r"rng-rank1.pt missing \(written by 2 ranks\)"):
        mgr.read_state(tmp_path / "checkpoints" / "step-000001")


@pytest.mark.parametrize(
    "pointer, warning",
    [("garbage\x00\x01", "not a checkpoint name"), ("step-000009", "names step-000009, which does not exist")],
)
def test_a_bad_latest_pointer_is_only_a_hint(tmp_path, caplog, pointer, warning):
    mgr = _three(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        path, state, _ = mgr.resume()
    assert path.name == "step-000003" and state["step"] == 3
    assert warning in caplog.text
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000003"  # repaired


def test_a_checkpoint_published_but_not_yet_pointed_to_is_used(tmp_path):
    """A crash between the rename into place and the switch of `latest`: the newer directory is complete."""
    mgr = _three(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-000002")
    assert mgr.resume()[0].name == "step-000003"


def test_no_intact_checkpoint_stops_with_an_error_that_says_how_to_start_over(tmp_path):
    mgr = _three(tmp_path)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-{step:06d}" / "trainer.pt").unlink()
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(CheckpointError) as info:
        mgr.resume()
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "step-000003: trainer.pt is missing" in message
    assert "checkpoint.resume=false" in message and "another output_dir" in message
    # nothing was moved, renamed or deleted
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001", "step-000002", "step-000003"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_metrics_without_any_checkpoint_are_history_too(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.resume() is None  # an empty output_dir: a fresh start
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(CheckpointError, match="there is no checkpoint"):
        mgr.resume()


def test_starting_over_moves_the_previous_run_aside(tmp_path, caplog):
    mgr = _three(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "metrics.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        aside = mgr.set_aside_previous_run()
    assert aside == tmp_path / "previous-1" and "previous-1" in caplog.text
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl", "metrics.png"]
    assert sorted(p.name for p in (aside / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002", "step-000003"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "previous-1"]
    assert mgr.set_aside_previous_run() is None  # nothing left to move
    mgr.save(1, _writer(1.0), {"step": 1})
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    assert mgr.set_aside_previous_run() == tmp_path / "previous-2"


def test_save_never_replaces_an_existing_checkpoint_silently(tmp_path, caplog):
    mgr = _three(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        mgr.save(3, _writer(33.0), {"step": 3})
    root = tmp_path / "checkpoints"
    assert "already existed" in caplog.text
    assert _weights(root / "step-000003.replaced").tolist() == [3.0] * 64
    assert _weights(root / "step-000003").tolist() == [33.0] * 64


# --------------------------------------------------------------------------------------------- the trainer's resume
# Real runs of the toy config: 3 GRPO steps with a checkpoint after every one, then the newest checkpoint damaged.

TOY = [
    "model.preset=tiny",
    "task.max_digits=2",
    "task.num_eval=4",
    "eval.samples=1",
    "sft.steps=0",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.mini_batches=1",
    "grpo.max_new_tokens=8",
    "training.chunk_len=64",
    "training.num_threads=1",
    "rollout.backend=native",
    "rewards.weights={arithmetic: 1.0, format: 1.0}",
    "eval.every=1",
    "grpo.steps=3",
    "checkpoint.every=1",
    "checkpoint.keep=3",
]


def _train(out_dir, *extra):
    from pathlib import Path

    from r1engine.trainer.config import load_config
    from r1engine.trainer.grpo import GRPOTrainer

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "demo.yaml", [f"output_dir={out_dir}", *TOY, *extra])
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _files(directory):
    """{relative path: bytes} of every file under `directory` (a checkpoint of the toy model is small)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    _train(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002", "step-000003"
    ]  # fmt: skip
    return out


def _lines(out):
    return (out / "metrics.jsonl").read_text().splitlines()


def _drop_a_tensor(d):
    """A model file that parses and is complete but lacks a tensor: found only when the weights are loaded."""
    from safetensors.torch import load_file

    f = d / "model" / "model.safetensors"
    state = load_file(str(f))
    state.pop(sorted(state)[0])
    save_file(state, str(f), metadata={"format": "pt"})


TRAINER_DAMAGE = {
    "truncated safetensors": (lambda d: _truncate(d / "model" / "model.safetensors"), "model.safetensors is cut short"),
    "missing safetensors": (lambda d: (d / "model" / "model.safetensors").unlink(), "model/ holds no weights"),
    "garbage config.json": (lambda d: (d / "model" / "config.json").write_text("{oops"), "not valid JSON"),
    "missing RNG file": (lambda d: (d / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "missing trainer.pt": (lambda d: (d / "trainer.pt").unlink(), "trainer.pt is missing"),
    "a tensor missing (found at load)": (_drop_a_tensor, "does not match its config.json: missing tensors"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", list(TRAINER_DAMAGE))
def test_trainer_resumes_from_the_newest_intact_checkpoint(toy_run, tmp_path, caplog, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    root = out / "checkpoints"
    older = {name: _files(root / name) for name in ("step-000001", "step-000002")}
    lines = _lines(out)
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]
    hurt, problem = TRAINER_DAMAGE[damage]
    hurt(root / "step-000003")
    damaged = _files(root / "step-000003")

    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        summary = _train(out)
    assert summary["steps"] == 3
    assert problem in caplog.text and "step-000003" in caplog.text and "resuming from" in caplog.text
    # the history up to the checkpoint resumed from is kept; step 3 is logged again by the resumed run
    after = _lines(out)
    assert after[:3] == lines[:3] and [json.loads(line)["step"] for line in after] == [0, 1, 2, 3]
    # no intact checkpoint was deleted or written over; the damaged one is kept aside, as it was
    assert {name: _files(root / name) for name in older} == older
    assert _files(root / "step-000003.damaged") == damaged
    assert (root / "latest").read_text() == "step-000003"
    CheckpointManager(out).verify(root / "step-000003")  # written again, intact


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "pointer, warning",
    [("\x00garbage", "not a checkpoint name"), ("step-000042", "names step-000042, which does not exist")],
)
def test_trainer_scans_for_checkpoints_when_latest_is_bad(toy_run, tmp_path, caplog, pointer, warning):
    """The run used to start from scratch here, truncating metrics.jsonl and later overwriting step-*."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    root = out / "checkpoints"
    before = {p.name: _files(p) for p in root.glob("step-*")}
    lines = _lines(out)
    (root / "latest").write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        summary = _train(out, "grpo.steps=4")  # resumes at step 3 and trains one more step
    assert warning in caplog.text and summary["steps"] == 4
    after = _lines(out)
    assert after[:4] == lines and [json.loads(line)["step"] for line in after] == [0, 1, 2, 3, 4]
    assert {name: _files(root / name) for name in before if name != "step-000001"} == {
        name: files for name, files in before.items() if name != "step-000001"
    }  # step 1 is pruned by keep=3, the others untouched
    assert (root / "latest").read_text() == "step-000004"


@pytest.mark.timeout(300)
def test_trainer_without_an_intact_checkpoint_stops_and_keeps_everything(toy_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    root = out / "checkpoints"
    for d in root.glob("step-*"):
        (d / "trainer.pt").unlink()
    before = _files(out)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from") as info:
        _train(out)
    assert "checkpoint.resume=false" in str(info.value) and str(out) in str(info.value)
    assert _files(out) == before  # nothing moved, truncated or deleted


@pytest.mark.timeout(300)
def test_trainer_starting_over_moves_the_previous_run_aside(toy_run, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    before = _files(out)
    with caplog.at_level(logging.WARNING, logger="r1engine.trainer.checkpoint"):
        _train(out, "checkpoint.resume=false", "grpo.steps=1")
    assert "previous-1" in caplog.text
    assert _files(out / "previous-1") == before
    assert [json.loads(line)["step"] for line in _lines(out)] == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]
