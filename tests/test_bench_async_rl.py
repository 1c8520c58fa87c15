"""The rollout-mode benchmark (benchmarks/bench_async_rl.py) on the demo task at a few steps: the off-policy modes'
synchronous warm-up reaches their runs, the per-step phases and the perfect-overlap estimate are reported, an earlier
run's JSON joins a later run's tables (its other modes too), and one with other settings is refused before anything
runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_async_rl.py"
TINY = ["--steps", "3", "--eval-every", "3", "--num-eval", "8", "--sft-steps", "5", "--sync-warmup", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.timeout(600)
def test_runs_join_across_invocations_and_mismatched_settings_are_refused_first(bench, tmp_path):
    first = tmp_path / "first.json"
    got = bench.main(
        [*TINY, "--modes", "sync,sync_remote,one_step_off", "--out", str(tmp_path / "first.md"), "--json", str(first)]
    )
    sync, remote, off = got["results"]
    assert (sync["mode"], remote["mode"], off["mode"]) == ("sync", "sync_remote", "one_step_off")
    assert sync["staleness_mean"] == 0.0
    for run in got["results"]:  # the per-step phases: the batch is part of the step, the evaluation is not
        assert len(run["batch_s"]) == len(run["step_no_eval_s"]) == 3
        assert all(0 < b < s for b, s in zip(run["batch_s"], run["step_no_eval_s"], strict=True))
        assert sum(run["step_no_eval_s"]) == pytest.approx(run["train_s"])
    # the estimate: sync_remote's steps with the batch and the rest overlapped
    longer = sum(max(b, s - b) for b, s in zip(remote["batch_s"], remote["step_no_eval_s"], strict=True))
    assert sum(remote["step_no_eval_s"]) / 2 <= longer < sum(remote["step_no_eval_s"])
    estimate = remote["samples"] / longer / sync["samples_per_s"]
    assert f"{remote['samples'] / longer:.2f} samples/s, {estimate:.2f}x sync's" in (tmp_path / "first.md").read_text()
    assert off["staleness_mean"] == pytest.approx(1 / 3)  # staleness 0, 0 (the warm-up, then its hand-over), 1
    assert json.loads(first.read_text())["args"]["sync_warmup"] == "1"

    with pytest.raises(SystemExit, match="settings differ from this run's in steps"):
        bench.main([*TINY, "--steps", "4", "--modes", "async", "--include", str(first), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="settings differ from this run's in worker_threads"):
        bench.main([*TINY, "--worker-threads", "2", "--modes", "async", "--include", str(first)])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="^--sync-warmup: must be >= 0, got -1$"):
        bench.main([*TINY, "--sync-warmup", "-1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="^--worker-threads: must be >= 0, got -1$"):
        bench.main([*TINY, "--worker-threads", "-1", "--out", str(tmp_path / "x")])

    out = tmp_path / "second.md"
    got = bench.main([*TINY, "--modes", "async", "--include", str(first), "--out", str(out)])
    assert [r["mode"] for r in got["results"]] == ["sync", "sync_remote", "one_step_off", "async"]  # joined
    ratio = got["results"][3]["samples_per_s"] / sync["samples_per_s"]
    assert f"| async | 0 | {got['results'][3]['samples_per_s']:.2f} | {ratio:.2f}x |" in out.read_text()
