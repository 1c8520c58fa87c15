"""`rewards.overlap` (issue 19): off, the trainer waits for the rewards before the old/reference log-prob inference
instead of after it, and the step is the same (rewards, advantages, log-probs, loss, updated weights); the key is
type-checked; the benchmark (benchmarks/bench_reward_overlap.py) runs at its quick size and prints the ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1engine.trainer import grpo
from r1engine.trainer.config import ConfigError, load_config

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_reward_overlap.py"
INFER = grpo.packed_logprobs


@pytest.fixture(scope="module")
def models(bench, tmp_path_factory):
    """The benchmark's quick setting: a tiny policy, a tiny pairwise reward model on the general route."""
    args = bench.parse_args(["--quick"])
    policy, rm = bench.make_models(tmp_path_factory.mktemp("models"), args)
    return args, policy, rm


class _Recorded:
    """A reward handle that notes when the trainer waits for it."""

    def __init__(self, handle, events: list[str]) -> None:
        self.handle, self.events = handle, events

    def result(self, timeout=None):
        self.events.append("rewards")
        return self.handle.result(timeout)


def _step(bench, models, out_dir: Path, overlap: bool, monkeypatch, *extra: str):
    """One step of a fresh trainer: (metrics, training fields, weights after it, the order of waits and inferences)."""
    args, policy, rm = models
    trainer = bench.build_trainer(out_dir, policy, rm, args, f"rewards.overlap={str(overlap).lower()}", *extra)
    assert trainer.cfg.rewards.overlap is overlap
    events: list[str] = []
    monkeypatch.setattr(grpo, "packed_logprobs", lambda *a, **k: (events.append("infer"), INFER(*a, **k))[1])
    roll_out = trainer._roll_out

    def recorded(*a, **k):
        prompts, rb, handle = roll_out(*a, **k)
        return prompts, rb, _Recorded(handle, events)

    trainer._roll_out = recorded
    try:
        record, fields = bench.run_step(trainer, 0, overlap)
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    return record, fields, weights, events


def test_without_overlap_the_rewards_come_first_and_the_step_is_the_same(bench, models, tmp_path, monkeypatch):
    lr = "grpo.lr=1e-3"  # the benchmark's 1e-12 would leave the weights as they were
    on = _step(bench, models, tmp_path / "on", True, monkeypatch, lr)
    off = _step(bench, models, tmp_path / "off", False, monkeypatch, lr)
    assert on[3] == ["infer", "infer", "rewards"]  # old and reference log-probs, then the wait
    assert off[3] == ["rewards", "infer", "infer"]
    (rec_on, f_on, w_on, _), (rec_off, f_off, w_off, _) = on, off
    assert torch.equal(f_on["rewards"], f_off["rewards"]) and torch.equal(f_on["adv"], f_off["adv"])
    assert f_on["rewards"].std() > 0 and f_on["adv"].abs().sum() > 0  # the reward model's scores vary
    for key in ("old", "ref"):
        assert all(torch.equal(a, b) for a, b in zip(f_on[key], f_off[key], strict=True))
    same = [k for k in rec_on if k.startswith(("reward/", "adv/", "loss/"))]
    assert "loss/policy" in same and "reward/rm/helpful/mean" in same
    assert {k: float(rec_on[k]) for k in same} == {k: float(rec_off[k]) for k in same}
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on)  # the same update
    for rec in (rec_on, rec_off):
        assert rec["time/reward_wait_s"] >= 0.0


def test_dynamic_sampling_waits_once_before_the_inference_either_way(bench, models, tmp_path, monkeypatch):
    _, fields, _, events = _step(bench, models, tmp_path, False, monkeypatch, "dapo.dynamic_sampling=true")
    assert events[0] == "rewards" and events.count("infer") == 2 and events[-1] == "infer"  # no second wait
    assert fields["adv"] is not None


def test_the_key_is_type_checked(tmp_path):
    assert load_config(None, [f"output_dir={tmp_path}"]).rewards.overlap is True
    assert load_config(None, [f"output_dir={tmp_path}", "rewards.overlap=false"]).rewards.overlap is False
    for value in ("maybe", "1"):
        with pytest.raises(ConfigError, match=r"rewards\.overlap: expected bool"):
            load_config(None, [f"output_dir={tmp_path}", f"rewards.overlap={value}"])


def test_the_benchmark_runs_quick_and_prints_the_ratio(bench, tmp_path, capsys):
    out, raw = tmp_path / "overlap.md", tmp_path / "overlap.json"
    result = bench.main(["--quick", "--out", str(out), "--json", str(raw)])
    printed = capsys.readouterr().out
    assert "speed-up from the overlap (median step without / with):" in printed
    assert min(result[k] for k in ("speedup", "paired_speedup", "window_speedup", "paired_window_speedup")) > 0
    for mode in ("overlap", "no_overlap"):
        assert len(result["steps"][mode]) == 1
        med = result["median"][mode]
        assert set(med) == {"step_s", "rollout_s", "inference_s", "reward_wait_s", "train_s", "window_s"}
        assert med["window_s"] == pytest.approx(med["inference_s"] + med["reward_wait_s"])
    text = out.read_text()
    for field in ("Command:", "commit", "Load average", "What the figures say", f"{result['speedup']:.2f}x"):
        assert field in text
    assert json.loads(raw.read_text())["speedup"] == pytest.approx(result["speedup"])
