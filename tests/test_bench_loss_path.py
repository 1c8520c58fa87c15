"""The loss-path benchmark (benchmarks/bench_loss_path.py) at a tiny size on CPU: every arm runs in its own process,
the arms compute the same loss and gradients on the same inputs, and the result and its markdown carry the reported
fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss_path.py"
TINY = ["--shapes", "32x300", "--tokens", "96", "--tokens-per-seq", "16", "--warmup-tokens", "16", "--threads", "1"]


@pytest.mark.timeout(300)
def test_main_runs_every_arm_and_they_agree(bench, tmp_path):
    out, raw = tmp_path / "loss_path.md", tmp_path / "loss_path.json"
    result = bench.main([*TINY, "--repeats", "2", "--out", str(out), "--json", str(raw)])

    (row,) = result["rows"]
    assert (row["h"], row["v"], row["n"]) == (32, 300, 96)
    assert row["logits_bytes"] == 96 * 300 * 4
    assert list(row["arms"]) == list(bench.ARMS)
    for name, a in row["arms"].items():
        assert len(a["times_s"]) == 2 and a["median_s"] > 0, name
        assert a["peak_extra_bytes"] is not None and a["peak_extra_bytes"] >= 0, name
        assert a["grad_hidden_norm"] > 0 and a["grad_weight_norm"] > 0, name
        assert a["entropy"] > 0, name
    assert row["arms"][bench.BASELINE]["speed_vs_baseline"] == pytest.approx(1.0)
    assert row["max_check_diff"] < 1e-5  # same loss, entropy and gradient norms on the same inputs
    for key in ("date", "commit", "device", "command", "torch"):
        assert result[key], key
    assert result["in_process"] is False

    text = out.read_text()
    for needle in ("Command: `python benchmarks/bench_loss_path.py", "(a) logits", "(b) logits", "(c) lm_head fused"):
        assert needle in text
    assert json.loads(raw.read_text())["rows"][0]["n"] == 96


def test_in_process_run(bench):
    result = bench.main([*TINY, "--repeats", "1", "--in-process", "--arms", "logits_inplace,lm_head_fused"])
    (row,) = result["rows"]
    assert list(row["arms"]) == ["logits_inplace", "lm_head_fused"]
    assert row["arms"]["logits_inplace"]["speed_vs_baseline"] is None  # no baseline arm: no ratios
    assert row["max_check_diff"] < 1e-5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "tiny"], "--shapes"),
        (["--tokens", "0"], "--tokens"),
        (["--arms", "logits_inplace,nope"], "--arms"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_name_the_flag(bench, argv, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_args([*TINY, *argv])
