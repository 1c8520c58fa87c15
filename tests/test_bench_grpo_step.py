"""The GRPO step benchmark (benchmarks/bench_grpo_step.py) at a tiny size on CPU: every path runs, all paths
compute the same step on the same batch, the result and its markdown carry the reported fields, and the packed
path is the trainer's own `grpo_train_step` computation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyConfig, PolicyModel
from r1engine.trainer.config import GRPOConfig
from r1engine.trainer.engine import TrainEngine
from r1engine.trainer.grpo import grpo_train_step

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_grpo_step.py"
TINY = ["--preset", "tiny", "--layers", "1", "--prompts", "2", "--group-size", "4", "--prompt-min", "4"]
TINY += ["--prompt-max", "12", "--max-new-tokens", "24", "--median-new-tokens", "8", "--mini-batches", "2"]


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_main_runs_all_paths_and_they_agree(bench, one_thread, tmp_path):
    out, raw = tmp_path / "grpo_step.md", tmp_path / "grpo_step.json"
    result = bench.main([*TINY, "--warmup", "1", "--repeats", "1", "--out", str(out), "--json", str(raw)])

    assert set(result["paths"]) == set(bench.PATHS)
    for name, p in result["paths"].items():
        assert p["oom"] is None, name
        assert p["train_s"] > 0 and p["infer_s"] > 0 and p["step_s"] > p["train_s"] + p["infer_s"], name
        assert p["train_tokens_per_s"] == pytest.approx(result["workload"]["real_tokens_per_step"] / p["train_s"])
        assert p["train_speedup"] > 0 and p["step_speedup"] > 0, name
        for key in ("peak_train_bytes", "peak_infer_bytes", "peak_train_total_bytes"):
            assert key in p, (name, key)
    assert result["paths"][bench.BASELINE]["train_speedup"] == pytest.approx(1.0)

    # Same batch, same starting weights, fp32: the paths compute the same loss, gradient and old log-probs.
    check = result["check"]
    assert set(check) == set(bench.PATHS)
    base = check[bench.BASELINE]
    assert base["grad_norm"] > 0 and base["mtp_loss"] > 0 and base["old_logprob_sum"] < 0
    for name, c in check.items():
        for key in ("policy_loss", "mtp_loss", "grad_norm", "old_logprob_sum"):
            assert c[key] == pytest.approx(base[key], rel=1e-4, abs=1e-6), (name, key)
    assert result["check_max_diff"] < 1e-4

    w = result["workload"]
    assert w["completion_len_max"] == 24  # the longest completion of every rollout runs to the cap
    assert w["completion_len_median"] < w["completion_len_max"]
    assert w["real_tokens_per_step"] <= w["packed_tokens_per_step"]
    assert w["real_tokens_per_step"] < w["padded_tokens_per_step"]
    assert w["decoded_tokens_per_step"] == 8 * 24  # every row decoded to the cap (ignore_eos)
    assert result["rollout"]["decoded_tokens_per_s"] > 0
    for key in ("date", "commit", "device", "command", "model"):
        assert result[key], key

    text = out.read_text()
    for needle in ("Command: `python benchmarks/bench_grpo_step.py", "| padded+eager |", "Same-batch check", "commit"):
        assert needle in text
    assert json.loads(raw.read_text())["paths"].keys() == result["paths"].keys()


def test_packed_step_is_the_trainers_step(bench, one_thread):
    """The benchmark's packed path computes what `grpo_train_step` computes (minus its entropy metric)."""
    cfg = GRPOConfig(max_new_tokens=16, beta=0.0)
    model = PolicyModel(PolicyConfig.tiny(vocab_size=97, num_layers=1))
    twin = copy.deepcopy(model)
    wl = bench.Workload(2, 3, 3, 7, 16, 5, 0.8, 1)
    gen = torch.Generator().manual_seed(3)
    engine = bench.create_engine("native", model=model, max_model_len=wl.longest)
    ro = bench.rollout(engine, wl, 97, gen, seed=3)
    old = bench.packed_old_logprobs(model, ro.seqs, wl.longest, cfg.temperature)
    old = [o + 0.05 * torch.randn(o.shape, generator=gen) * (o != 0) for o in old]  # off-policy: ratio != 1

    engines = TrainEngine(model, lr=1e-2), TrainEngine(twin, lr=1e-2)
    ours = bench.packed_fused_step(model, engines[0], ro.seqs, old, ro.advantages, cfg, wl.longest)
    trainer = grpo_train_step(
        twin, engines[1], ro.seqs, old=old, ref=None, advantages=ro.advantages, cfg=cfg, chunk_len=wl.longest,
    )  # fmt: skip
    assert ours.policy_loss == pytest.approx(trainer["loss/policy"], rel=1e-5)
    assert ours.mtp_loss == pytest.approx(trainer["loss/mtp"], rel=1e-5)
    assert ours.grad_norm == pytest.approx(trainer["loss/grad_norm"], rel=1e-5)
    # The same gradient: compared through AdamW's first moment, (1 - beta1) * clipped gradient. (Not the updated
    # weights: a first AdamW step moves each weight by about lr * sign(g), so rounding noise in a gradient entry
    # near 0 can move its weight by up to 2 * lr.)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        m_a, m_b = engines[0].optimizer.state[a]["exp_avg"], engines[1].optimizer.state[b]["exp_avg"]
        torch.testing.assert_close(m_a, m_b, rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mini-batches", "3"], "--mini-batches"),
        (["--paths", "packed+fused,nope"], "--paths"),
        (["--median-new-tokens", "99"], "--median-new-tokens"),
        (["--chunk-len", "10"], "--chunk-len"),
    ],
)
def test_bad_arguments_name_the_flag(bench, argv, message):
    with pytest.raises(ValueError, match=message):
        bench.run(bench.parse_args([*TINY, *argv]))
