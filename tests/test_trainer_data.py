"""GRPO on data files as users bring them (TRL's JSONL, verl's parquet) with a transformers checkpoint: trains
without a conversion step, logs per-source rewards and held-out accuracy with its standard error, resumes the data
position exactly, and refuses data nobody can score before any rollout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1engine.data.word_problems import generate, to_rows, write
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.trainer.config import load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics

pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "sft.steps=0",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.mini_batches=1",
    "grpo.max_new_tokens=8",
    "grpo.beta=0",
    "training.chunk_len=512",
    "training.num_threads=1",
    "eval.samples=1",
    "rollout.backend=native",
    "rollout.num_speculative_tokens=0",
    "data.eval_size=4",
    "rewards.weights={math_accuracy: 1.0, format: 1.0}",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("m") / "llama", seed=4)


@pytest.mark.parametrize("layout,suffix,template", [("trl", "jsonl", "r1_zero"), ("verl", "parquet", "chat")])
@pytest.mark.timeout(600)
def test_trains_on_the_users_file_and_resumes_its_position(tmp_path, model_dir, layout, suffix, template):
    data = write(tmp_path / f"train.{suffix}", to_rows(generate(40, seed=3), layout))
    args = [f"output_dir={tmp_path / 'run'}", f"model.path={model_dir}", f"data.train_files={data}",
            f"data.template={template}", "checkpoint.every=1", *SMALL]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*args, "grpo.steps=1"])
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        assert len(trainer.task.train) == 36 and len(trainer.task.eval_problems) == 4
        trainer.run()
        position = trainer.stream.state()
    finally:
        trainer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert 0.0 <= records[0]["eval/accuracy"] <= 1.0 and "eval/accuracy_stderr" in records[0]
    last = records[-1]
    assert "reward/source/word_problems/mean" in last and "reward/math_accuracy/mean" in last
    assert last["data/epoch"] == 0
    cfg2 = load_config(ROOT / "configs" / "demo.yaml", [*args, "grpo.steps=2"])
    resumed = GRPOTrainer(cfg2, progress=False)
    try:
        resumed.run()  # resumes from the step-1 checkpoint: the data position comes back with it
        assert resumed.stream.state()["inner"] == {"epoch": 0, "index": position["inner"]["index"] + 2}
    finally:
        resumed.close()


def test_a_source_without_a_route_fails_before_any_rollout(tmp_path, model_dir):
    data = write(tmp_path / "train.jsonl", to_rows(generate(20, seed=3), "trl"))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "r1engine.cli", "train", "--config", "configs/demo.yaml", f"output_dir={out}",
         f"model.path={model_dir}", f"data.train_files={data}", *SMALL, "rewards.weights={}",
         "rewards.routes={gsm8k: {math_accuracy: 1}}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("r1engine: data error: rewards.routes: no route for data source 'word_problems'")
    assert "Traceback" not in result.stderr and not (out / "metrics.jsonl").exists()


def test_bad_data_keys_fail_in_the_config(tmp_path):
    from r1engine.trainer.config import ConfigError

    for override, match in [
        ("data.template=Solve this", "data.template: must be one of"),
        ("rewards.routes={gsm8k: {acuracy: 1}}", "rewards.routes.gsm8k.acuracy: unknown reward"),
        ("rewards.options={code: {time_limit_s: 5}}", "rewards.options.code: no route uses this reward"),
        ("data.eval_files=[x.jsonl]", "data.eval_files: given without data.train_files"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(ROOT / "configs" / "demo.yaml", [override])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "solution": "1"}) + "\n")
    with pytest.raises(ConfigError, match="sft.steps: the cold-start SFT trains on a built-in task"):
        load_config(ROOT / "configs" / "demo.yaml", [f"data.train_files={data}"])


def right_number(completions, references, **columns):
    """A caller's reward in TRL's style: 1 when the reference number appears, times the row's `weight` column."""
    return [float(str(r) in c) * w for c, r, w in zip(completions, references, columns["weight"], strict=True)]


@pytest.mark.timeout(600)
def test_python_entry_point_takes_model_tokenizer_dataset_and_rewards(tmp_path, model_dir):
    import transformers

    from r1engine.models.tokenizer import load_tokenizer

    rows = [{"question": q, "answer": str(a), "weight": 0.5} for q, a in generate(30, seed=5)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = load_config(None, [f"output_dir={tmp_path}", *SMALL, "grpo.steps=1", "data.prompt_key=question"])
    trainer = GRPOTrainer(cfg, model=hf, tokenizer=load_tokenizer(model_dir), dataset=rows, reward_fns=[right_number],
                          progress=False)  # fmt: skip
    try:
        assert len(trainer.task.train) == 26 and trainer.rewards.routes.weights("") == {"right_number": 1.0}
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 1
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert 0.0 <= last["reward/right_number/mean"] <= 0.5  # the weight column reached the reward
