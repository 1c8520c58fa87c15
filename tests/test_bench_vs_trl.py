"""benchmarks/bench_vs_trl.py: the model-dependent defaults of each mode and the refusal of inconsistent flags (the
runs themselves take tens of minutes and live in benchmarks/results/)."""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_vs_trl.py"


def test_each_mode_fills_its_own_defaults(bench):
    toy = bench.parse_args([])
    assert (toy.rollouts, toy.max_new_tokens, toy.mini_batches, toy.r1_rollout) == (12, 72, 2, "native")
    real = bench.parse_args(["--model", "smollm2"])
    assert (real.rollouts, real.max_new_tokens, real.mini_batches, real.beta) == (4, 96, 1, 0.0)
    assert (real.r1_rollout, real.trl_generation, real.rows, real.eval_size) == ("vllm", "generate", 400, 8)
    assert real.work_dir.endswith("bench_vs_trl_smollm2")
    assert bench.parse_args(["--model", "smollm2", "--lr", "3e-5"]).lr == 3e-5


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--trl-generation", "vllm"], "--trl-generation"),  # smollm2 only
        (["--model", "smollm2", "--beta", "0.01"], "--beta"),
        (["--model", "smollm2", "--eval-size", "400"], "--eval-size"),
        (["--model", "smollm2", "--max-new-tokens", "200"], "--max-new-tokens"),
        (["--rollouts", "1"], "--rollouts"),
        (["--group", "1"], "--group"),
        (["--mini-batches", "3"], "--mini-batches"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_inconsistent_flags_are_refused_by_name(bench, capsys, argv, flag):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert flag in capsys.readouterr().err
