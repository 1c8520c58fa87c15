"""R1's second RL stage as a recipe (issue 19): a `reward_model` stage trains a reward model, a `grpo` stage on a
Hugging Face model and data files routes general rows to it (`reward_models: {name: stage}`) and reasoning rows to the
rule rewards; the `pattern` rule that knows the hidden preference, the synthetic second-person preference data, and
reward models cut to their first layers (`model.num_layers`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from r1engine.data.word_problems import generate
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.recipes import RecipeRunner, load_recipe
from r1engine.reward_models import RewardModel
from r1engine.reward_models.config import load_rm_config
from r1engine.reward_models.synthetic import (
    SECOND_PERSON_PATTERN,
    general_prompt_rows,
    preference_rows,
    second_person_rows,
    write_jsonl,
)
from r1engine.reward_models.synthetic import main as synthetic_main
from r1engine.rewards import get_reward
from r1engine.trainer.config import ConfigError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ pattern reward
def test_pattern_reward_searches_the_final_summary_case_insensitively():
    reward = get_reward("pattern", pattern=SECOND_PERSON_PATTERN)
    texts = ["You should rest.", "<think>you</think> It is best to rest.", "Rest; it helps your sleep.", "Youth."]
    assert [r.score for r in reward(texts, [None] * 4)] == [1.0, 0.0, 1.0, 0.0]
    assert reward(["It is best."], [None])[0].reason == "no match"
    whole = get_reward("pattern", pattern=SECOND_PERSON_PATTERN, whole_response=True)
    assert whole(["<think>you</think> It is best to rest."], [None])[0].score == 1.0
    assert get_reward("pattern", pattern="you", flags="")(["YOU"], [None])[0].score == 0.0  # case-sensitive


@pytest.mark.parametrize(
    ("options", "message"),
    [({}, "a non-empty regular expression"), ({"pattern": "(unclosed"}, "not a regular expression"),
     ({"pattern": "x", "flags": "q"}, "unknown flag 'q'")],
)  # fmt: skip
def test_pattern_reward_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=rf"rewards\.options\.pattern\..*{message}"):
        get_reward("pattern", **options)


# ------------------------------------------------------------------------------------------------ synthetic data
def test_second_person_rows_differ_only_in_the_hidden_preference():
    rows = second_person_rows(600, seed=3)
    you = re.compile(SECOND_PERSON_PATTERN, re.IGNORECASE)
    assert all(you.search(r["chosen"]) for r in rows)
    assert not any(you.search(r["rejected"]) for r in rows)
    # length gives nothing away: the chosen response is the longer one about as often as the shorter one
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    assert abs(longer - shorter) < 0.2 * len(rows)
    assert second_person_rows(5, seed=3) == rows[:5]  # deterministic per seed


def test_general_prompt_rows_route_to_their_source_and_the_cli_writes_them(tmp_path, capsys):
    rows = general_prompt_rows(20, seed=1, source="chat")
    assert {r["data_source"] for r in rows} == {"chat"} and all(r["prompt"] and r["solution"] for r in rows)
    assert synthetic_main(["second_person", str(tmp_path / "p.jsonl"), "--rows", "7"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 7
    with pytest.raises(SystemExit):
        synthetic_main(["general_prompts", str(tmp_path / "g.jsonl"), "--rows", "0"])
    assert "--rows: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ keep_layers
def test_a_reward_model_cut_to_its_first_layers_saves_a_checkpoint_transformers_scores_alike(tmp_path):
    src = make_tiny_hf_model("qwen2", tmp_path / "body", seed=2, num_hidden_layers=3)
    rm = RewardModel.from_pretrained(src).keep_layers(1)
    assert len(rm.body.model.layers) == 1 and rm.config.num_layers == 1
    rm.save_pretrained(tmp_path / "rm", transformers.AutoTokenizer.from_pretrained(src))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_hidden_layers == 1
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    with torch.no_grad():
        ours = rm.eval()(ids[0], torch.tensor([0, 5], dtype=torch.int32))
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"num_layers: must be in \[1, 1\]"):
        rm.keep_layers(2)


def test_rm_config_num_layers_needs_a_checkpoint(tmp_path):
    data = write_jsonl(second_person_rows(4), tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="model.num_layers: applies with model.path"):
        load_rm_config(None, [f"data.train_files=[{data}]", "model.num_layers=2"])


# ------------------------------------------------------------------------------------------------ the recipe
SMALL = {
    "sft.steps": 0, "grpo.steps": 2, "grpo.prompts_per_step": 4, "grpo.group_size": 2, "grpo.mini_batches": 1,
    "grpo.max_new_tokens": 8, "grpo.beta": 0.0, "training.chunk_len": 512, "training.num_threads": 1,
    "eval.samples": 1, "eval.every": 1, "rollout.backend": "native", "rollout.num_speculative_tokens": 0,
    "data.eval_size": 8, "model.mtp_layers": 0,
}  # fmt: skip
ROUTES = {"math": {"math_accuracy": 1.0}, "general": {"rm:helpful": 1.0, "pattern": 0.0}}


def _recipe(tmp_path: Path, **grpo_stage) -> dict:
    policy = make_tiny_hf_model("llama", tmp_path / "policy", seed=4)
    math = [{"prompt": q, "solution": str(a), "data_source": "math"} for q, a in generate(16, seed=5)]
    data = write_jsonl(math + general_prompt_rows(16, seed=2), tmp_path / "data.jsonl")
    prefs = write_jsonl(second_person_rows(24, seed=1), tmp_path / "prefs.jsonl")
    rm = {"kind": "pairwise", "input": "single", "model": {"path": str(policy), "num_layers": 1},
          "data": {"train_files": [str(prefs)], "eval_size": 8},
          "training": {"batch_size": 8, "lr": 1.0e-3}}  # fmt: skip
    overrides = {**SMALL, "model.path": str(policy), "data.train_files": [str(data)]}
    second_stage = {"rewards.weights": {}, "rewards.routes": ROUTES, "rewards.model_rewards_from_step": 1,
                    "rewards.options": {"pattern": {"pattern": SECOND_PERSON_PATTERN}}}  # fmt: skip
    stages = [{"name": "rm", "kind": "reward_model", "rm": rm},
              {"name": "general_rl", "kind": "grpo", "reward_models": {"helpful": "rm"}, "overrides": second_stage,
               **grpo_stage}]  # fmt: skip
    return {"config": str(ROOT / "configs" / "demo.yaml"), "output_dir": str(tmp_path / "run"),
            "overrides": overrides, "stages": stages}  # fmt: skip


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.timeout(600)
def test_reward_model_stage_feeds_the_second_rl_stage(tmp_path):
    recipe = load_recipe(_write(tmp_path, _recipe(tmp_path)))  # validates before the reward model exists
    records = RecipeRunner(recipe, progress=False).run()
    out = tmp_path / "run"
    assert [r["name"] for r in records] == ["rm", "general_rl"]
    rm_record, rl_record = records
    assert rm_record["kind"] == "reward_model" and 0.0 <= rm_record["rm/pairwise_acc"] <= 1.0
    trained = RewardModel.from_pretrained(out / "rm" / "model")
    assert trained.config.num_layers == 1 and trained.fmt.input == "single"
    assert rl_record["reward_models"] == {"helpful": str(out / "rm" / "model")}
    # the trainer's own held-out evaluation, per source: math by its rule, general rows by the pattern rule
    assert 0.0 <= rl_record["eval/accuracy/math"] <= 1.0 and 0.0 <= rl_record["eval/accuracy/general"] <= 1.0
    metrics = [json.loads(line) for line in (out / "general_rl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["reward/rm/active"] == 0.0 and metrics[2]["reward/rm/active"] == 1.0
    assert "reward/pattern/mean" in metrics[2] and "reward/rm/helpful/mean" in metrics[2]
    assert (out / "general_rl" / "model" / "config.json").is_file()
    assert "general_rl" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reward_models": {"helpful": "general_rl"}}, r"reward_models\.helpful: 'general_rl' is not an earlier"),
        ({"rm": {"kind": "pairwise"}}, r"\.rm: only reward_model stages"),
    ],
)
def test_bad_model_reward_stages_name_the_key(tmp_path, change, message):
    recipe = _recipe(tmp_path)
    recipe["stages"][1].update(change)
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, recipe))


def test_rm_stage_config_errors_name_the_stage_and_sft_refuses_a_users_model(tmp_path):
    recipe = _recipe(tmp_path)
    recipe["stages"][0]["rm"]["training"]["lr"] = -1
    with pytest.raises(ConfigError, match=r"stages\.rm\.rm\.training\.lr: must be a finite value > 0"):
        load_recipe(_write(tmp_path, recipe))
    recipe = _recipe(tmp_path)
    recipe["stages"].append({"name": "sft", "kind": "sft", "from": "general_rl", "data": {"source": "task"}})
    with pytest.raises(ConfigError, match="sft stages run on the built-in task"):
        load_recipe(_write(tmp_path, recipe))


@pytest.mark.timeout(600)
def test_rejection_sampling_ranks_with_a_reward_model(tmp_path):
    """A sample stage whose rewards name `rm:<name>`: each prompt's samples are ranked by the rule rewards plus the
    reward model's preference within the prompt's group, so the kept traces' rewards carry the model's share."""
    prefs = write_jsonl(preference_rows(16, seed=1), tmp_path / "prefs.jsonl")
    tiny = {"model.preset": "tiny", "task.max_digits": 1, "task.num_eval": 8, "sft.batch_size": 16, "sft.lr": 3.0e-3,
            "grpo.max_new_tokens": 48, "training.chunk_len": 64, "training.num_threads": 1,
            "rollout.backend": "native"}  # fmt: skip
    weights = {"arithmetic": 1.0, "format": 1.0, "rm:helpful": 1.0}
    recipe = {
        "config": str(ROOT / "configs" / "demo.yaml"),
        "output_dir": str(tmp_path / "run"),
        "overrides": tiny,
        "stages": [
            {"name": "base", "kind": "sft", "data": {"source": "corpus", "mix": {"direct": 0.2, "compact": 0.8}},
             "overrides": {"sft.steps": 200}},
            {"name": "rm", "kind": "reward_model",
             "rm": {"data": {"train_files": [str(prefs)], "eval_size": 4}, "training": {"batch_size": 12}}},
            {"name": "rs", "kind": "sample", "from": "base", "prompts": 16, "samples": 4,
             "reward_models": {"helpful": "rm"}, "overrides": {"rewards.weights": weights}},
        ],
    }  # fmt: skip
    records = RecipeRunner(load_recipe(_write(tmp_path, recipe)), progress=False).run()
    rs = records[-1]
    traces = [json.loads(line) for line in (tmp_path / "run" / "rs" / "traces.jsonl").open()]
    assert rs["kept"] == len(traces) > 0, "the base model should solve some 1-digit additions"
    for t in traces:  # kept traces pass both rules (2.0) and add the model's win probability in (0, 1)
        assert 2.0 < t["reward"] < 3.0


def test_shipped_second_stage_recipe_is_valid(tmp_path, monkeypatch):
    if not (ROOT / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file():
        pytest.skip("models/SmolLM2-135M-Instruct is absent (bash scripts/fetch_smollm2.sh)")
    monkeypatch.chdir(ROOT)
    math = [{"prompt": q, "solution": str(a), "data_source": "word_problems"} for q, a in generate(8, seed=5)]
    data = [write_jsonl(math, tmp_path / "math.jsonl"), write_jsonl(general_prompt_rows(8), tmp_path / "g.jsonl")]
    recipe = load_recipe(ROOT / "configs" / "recipes" / "r1_general_smollm2.yaml",
                         [f"data.train_files=[{data[0]}, {data[1]}]", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    rm_stage, rl_stage = recipe.stages
    assert (rm_stage.kind, rl_stage.kind, rl_stage.reward_models) == (
        "reward_model",
        "grpo",
        {"helpful": rm_stage.name},
    )
    cfg = recipe.stage_config(rl_stage)
    assert cfg.rewards.routes["general"] == {"rm:helpful": 1.0, "pattern": 0.0}
    assert cfg.rewards.model_rewards_from_step > 0 and cfg.reward_models["helpful"].pairing == "round_robin"
    assert re.compile(cfg.rewards.options["pattern"]["pattern"]).pattern == SECOND_PERSON_PATTERN


def test_the_plot_draws_every_rule_reward_and_the_accuracy_per_source(tmp_path, monkeypatch):
    from r1engine.trainer import metrics

    records = [{"step": s, "reward/mean": 0.5, "reward/pattern/mean": 0.1 * s, "reward/rm/helpful/mean": 0.5,
                "reward/source/general/mean": 0.4, "eval/accuracy": 0.4, "eval/accuracy_stderr": 0.05,
                "eval/accuracy/general": 0.2 * s, "eval/accuracy/math": 0.3} for s in range(3)]  # fmt: skip
    drawn: dict[str, list[str]] = {}
    original = metrics._per_name_keys
    monkeypatch.setattr(metrics, "_per_name_keys", lambda r, panel: drawn.setdefault(panel, original(r, panel)))
    metrics.plot_metrics(records, tmp_path / "m.png")
    assert drawn["reward"] == ["reward/pattern/mean"]  # not the reward models' or the sources' means
    assert drawn["held-out accuracy"] == ["eval/accuracy/general", "eval/accuracy/math"]
    assert (tmp_path / "m.png").is_file()
