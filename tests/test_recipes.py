"""Recipes: the shipped R1-Zero, R1 and distillation recipes are valid, bad recipes fail naming the key, and a
tiny five-stage recipe (SFT -> GRPO -> rejection sampling -> SFT on the kept traces) runs end to end, each stage
reading the model the previous one wrote, and is skipped stage by stage when run again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1engine.models import PolicyModel
from r1engine.recipes import RecipeRunner, load_recipe
from r1engine.trainer.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["r1_zero", "r1", "distill"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(ROOT / "configs" / "recipes" / f"{name}.yaml")
    kinds = [s.kind for s in recipe.stages]
    assert "grpo" in kinds or name == "distill"
    for stage in recipe.stages:
        recipe.stage_config(stage)  # each stage's training config validates


def test_r1_recipe_has_the_paper_stages():
    recipe = load_recipe(ROOT / "configs" / "recipes" / "r1.yaml")
    by_name = {s.name: s for s in recipe.stages}
    assert [s.kind for s in recipe.stages] == ["sft", "sft", "grpo", "sample", "sft", "grpo"]
    assert "language_consistency" in recipe.stage_config(by_name["reasoning_rl"]).rewards.weights
    assert recipe.stage_config(by_name["final_rl"]).grpo.temperature == 0.7
    assert by_name["rs_sft"].data == {"source": "traces", "stage": "rejection_sampling"}


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


BASE = {"config": str(ROOT / "configs" / "demo.yaml")}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "kind": "pretrain"}], r"stages\[0\] \(a\)\.kind"),
        ([{"name": "a", "kind": "grpo", "from": "nowhere"}], r"\.from: 'nowhere'"),
        ([{"name": "a", "kind": "sft", "data": {"source": "task", "style": "poetic"}}], "unknown solution style"),
        ([{"name": "a", "kind": "sft", "data": {"source": "traces", "stage": "a"}}], r"data\.stage"),
        ([{"name": "a", "kind": "sft", "data": {"source": "task"}, "overrides": {"grpo.stepz": 3}}], "a.overrides"),
        ([{"name": "a", "kind": "sft", "data": {"source": "task"}, "epochs": 3}], r"stages\[0\]\.epochs"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, {**BASE, "stages": stages}))


def test_override_of_an_unknown_stage_is_an_error(tmp_path):
    path = _write(tmp_path, {**BASE, "stages": [{"name": "a", "kind": "sft", "data": {"source": "task"}}]})
    with pytest.raises(ConfigError, match="no stage named 'b'"):
        load_recipe(path, ["stages.b.sft.steps=3"])


TINY = {
    "model.preset": "tiny", "task.max_digits": 1, "task.num_eval": 8, "sft.batch_size": 16, "sft.lr": 3.0e-3,
    "grpo.prompts_per_step": 4, "grpo.group_size": 4, "grpo.mini_batches": 2, "grpo.max_new_tokens": 48,
    "grpo.lr": 1.0e-3, "training.chunk_len": 64, "training.num_threads": 1, "rollout.backend": "native",
    "eval.every": 1, "checkpoint.every": 1,
}  # fmt: skip


@pytest.mark.timeout(600)
def test_tiny_multi_stage_recipe_runs_and_resumes(tmp_path):
    out = tmp_path / "run"
    recipe = {
        **BASE,
        "output_dir": str(out),
        "overrides": TINY,
        "stages": [
            {"name": "base", "kind": "sft", "data": {"source": "corpus", "mix": {"direct": 0.2, "compact": 0.8}},
             "overrides": {"sft.steps": 200}},
            # a small step size: two steps must not wreck the base model the rejection sampling reads
            {"name": "rl", "kind": "grpo", "from": "base", "overrides": {"grpo.steps": 2, "grpo.lr": 1.0e-5}},
            {"name": "rs", "kind": "sample", "from": "rl", "prompts": 32, "samples": 4, "temperature": 0.7},
            {"name": "rs_sft", "kind": "sft", "from": "base", "data": {"source": "traces", "stage": "rs"},
             "overrides": {"sft.steps": 3}},
        ],
    }  # fmt: skip
    path = _write(tmp_path, recipe)
    records = RecipeRunner(load_recipe(path), progress=False).run()
    assert [r["name"] for r in records] == ["base", "rl", "rs", "rs_sft"]
    for name in ("base", "rl", "rs_sft"):
        assert (out / name / "stage.json").is_file()
        PolicyModel.from_pretrained(out / name / "model")  # each stage leaves a loadable model directory
        record = json.loads((out / name / "stage.json").read_text())
        assert 0.0 <= record["eval/accuracy"] <= 1.0 and record["eval/response_len_mean"] > 0
    assert (out / "rl" / "metrics.jsonl").is_file()
    rs = records[2]
    traces = [json.loads(line) for line in (out / "rs" / "traces.jsonl").open()]
    assert rs["kept"] == len(traces) > 0, "the base model should solve some 1-digit additions"
    for t in traces:  # only correct, well-formatted completions are kept
        a, b = t["prompt"].rstrip("=").split("+")
        assert t["completion"].endswith(f"<answer>{int(a) + int(b)}</answer>") and "<think>" in t["completion"]
    assert (out / "summary.md").read_text().count("\n") == 2 + 4
    assert (out / "summary.png").is_file()

    # Run again through the CLI: every stage is finished, nothing is retrained.
    before = (out / "rs_sft" / "model" / "model.safetensors").stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "r1engine.cli", "recipe", str(path), "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("| ") >= 4 and "rs_sft" in result.stdout
    assert (out / "rs_sft" / "model" / "model.safetensors").stat().st_mtime_ns == before
