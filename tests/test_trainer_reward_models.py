"""The trainer's reward models (issue 19, item 4): routes that name `rm:<name>` score general rows with a reward model
and reasoning rows with the rule rewards, `rewards.model_rewards_from_step` switches the models on late, the per-model
and per-source metrics and the reward-hacking monitor are logged, and bad routes or models fail with errors that name
the key and the row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1engine.data import DataError
from r1engine.data.problem import Problem
from r1engine.data.word_problems import generate
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.reward_models import RewardFormat, RewardModel
from r1engine.rewards.routing import RewardRoutes
from r1engine.rewards.scheduler import RewardBatch
from r1engine.trainer.config import ConfigError, load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import HACKING_PANEL, read_metrics, reward_model_keys
from r1engine.trainer.model_rewards import ModelRewards

transformers = pytest.importorskip("transformers")

SMALL = [
    "sft.steps=0",
    "grpo.prompts_per_step=6",
    "grpo.group_size=2",
    "grpo.mini_batches=1",
    "grpo.max_new_tokens=8",
    "grpo.beta=0",
    "training.chunk_len=512",
    "training.num_threads=1",
    "eval.samples=1",
    "rollout.backend=native",
    "rollout.num_speculative_tokens=0",
    "data.eval_size=6",
    "rewards.weights={}",
]
ROUTES = "rewards.routes={math: {math_accuracy: 1.0, format: 1.0}, general: {'rm:helpful': 1.0}}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("m") / "llama", seed=4)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    """A tiny pairwise reward model: a random qwen2 body with a fixed head large enough that scores differ."""
    root = tmp_path_factory.mktemp("rm")
    src = make_tiny_hf_model("qwen2", root / "body", seed=1)
    rm = RewardModel.from_pretrained(src, fmt=RewardFormat(kind="pairwise", input="single"))
    rm.reset_head(3)
    with torch.no_grad():
        rm.score.weight.mul_(50)
    rm.save_pretrained(root / "rm", transformers.AutoTokenizer.from_pretrained(src))
    return root / "rm"


def _rows() -> list[dict]:
    math = [{"prompt": q, "answer": str(a), "data_source": "math"} for q, a in generate(24, seed=5)]
    topics = ["rivers", "bread", "chess", "rain", "owls", "glass", "bees", "maps", "tea", "salt", "kites", "moss"]
    general = [{"prompt": f"Write two sentences about {t}.", "answer": f"Some words on {t}.", "data_source": "general"}
               for t in topics * 2]  # fmt: skip
    return [row for pair in zip(math, general, strict=True) for row in pair]


def _config(tmp_path: Path, *extra: str, rm: Path | str | None = None):
    models = [f"reward_models={{helpful: {{path: {rm}}}}}"] if rm is not None else []
    return load_config(None, [f"output_dir={tmp_path}", *SMALL, ROUTES, *models, *extra])


# ------------------------------------------------------------------------------------------------ config errors
def test_a_route_naming_an_unknown_reward_model_names_the_key_and_the_known_ones(tmp_path, rm_dir):
    with pytest.raises(ConfigError, match=r"rewards\.routes\.general\.rm:helpful: no reward model named 'helpful' in "
                       r"reward_models \(known: none\)"):  # fmt: skip
        _config(tmp_path)
    with pytest.raises(ConfigError, match=r"rewards\.routes\.general\.rm:helpful: .*\(known: other\)"):
        _config(tmp_path, f"reward_models={{other: {{path: {rm_dir}}}}}")
    with pytest.raises(ConfigError, match=r"rewards\.weights\.rm:x: no reward model named 'x'"):
        load_config(None, [f"output_dir={tmp_path}", "rewards.weights={'rm:x': 1.0}"])


def test_reward_model_keys_are_checked(tmp_path, rm_dir):
    with pytest.raises(ConfigError, match=r"reward_models\.helpful\.path: '.*nowhere' does not exist"):
        _config(tmp_path, rm=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"reward_models\.helpful\.pairing: must be one of"):
        _config(tmp_path, "reward_models.helpful.pairing=everyone", rm=rm_dir)
    with pytest.raises(ConfigError, match=r"rewards\.model_rewards_from_step: must be >= 0, got -1"):
        _config(tmp_path, "rewards.model_rewards_from_step=-1", rm=rm_dir)
    with pytest.raises(ConfigError, match=r"reward_models\.helpful\.unknown: unknown key"):
        _config(tmp_path, "reward_models.helpful.unknown=1", rm=rm_dir)


def test_a_model_that_does_not_load_and_a_row_routed_to_a_missing_model(tmp_path, rm_dir):
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path, rm=tmp_path / "empty")
    routes = RewardRoutes(cfg.rewards.weights, cfg.rewards.routes)
    with pytest.raises(ConfigError, match=r"reward_models\.helpful: the reward model did not load: "):
        ModelRewards(cfg, routes, "cpu")
    with pytest.raises(ConfigError, match=r"reward_models\.helpful\.kind: .*safety needs a pointwise classifier"):
        ModelRewards(_config(tmp_path, "reward_models.helpful.kind=safety", rm=rm_dir), routes, "cpu")
    rewards = ModelRewards(_config(tmp_path, rm=rm_dir), routes, "cpu")
    try:
        rewards.judges.pop("helpful").scorer.close()  # as if it had not loaded
        rows = [Problem("2 + 2?", "4", "math"), Problem("Say hi.", "Hi.", "general")]
        with pytest.raises(DataError, match=r"row 1 \(source 'general'\): its route rewards\.routes\.general names "
                           r"reward model 'helpful', which is not loaded"):  # fmt: skip
            rewards.judges["other"] = None  # keep the set non-empty so that the models are on
            rewards.submit(None, [0], ["4", "hi"], rows, [0, 1], step=0)
    finally:
        rewards.judges.clear()


# ------------------------------------------------------------------------------------------------ a real run
@pytest.mark.timeout(900)
def test_general_rows_get_the_model_reward_from_the_switch_step(tmp_path, model_dir, rm_dir):
    cfg = _config(
        tmp_path,
        f"model.path={model_dir}",
        "grpo.steps=3",
        "rewards.model_rewards_from_step=1",
        "eval.every=1",
        rm=rm_dir,
    )
    trainer = GRPOTrainer(cfg, dataset=_rows(), progress=False)
    try:
        assert trainer._eval_problems and all(p.source == "math" for p in trainer._eval_problems)  # rule-checked
        assert trainer.rewards.routes.keys == ["", "math"]  # the workers never see the general rows
        summary = trainer.run()
    finally:
        trainer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    before, *after = records[1:]
    assert before["reward/rm/active"] == 0.0 and "reward/rm/helpful/mean" not in before  # not computed before
    assert before["reward/source/general/mean"] == 0.0  # no rule reward on the general route
    for r in after:
        assert r["reward/rm/active"] == 1.0
        rm_mean = r["reward/rm/helpful/mean"]
        assert 0.0 < rm_mean < 1.0 and r["reward/rm/helpful/rows"] > 0
        # the general rows' reward is the model's alone (weight 1); the math rows' the rule rewards
        assert r["reward/source/general/mean"] == pytest.approx(rm_mean)
        assert 0.0 <= r["reward/source/math/mean"] <= 2.0
        assert "reward/math_accuracy/mean" in r and "reward/format/mean" in r
        assert "rollout/response_len_mean" in r and "eval/accuracy" in r  # the monitor's other two curves
    assert reward_model_keys(records) == ["reward/rm/helpful/mean", "reward/rm/helpful/score_mean"]
    assert Path(summary["plot"]).is_file()


def test_the_plot_has_the_reward_hacking_panel(tmp_path, monkeypatch):
    from r1engine.trainer import metrics

    seen = []
    original = metrics._hacking_monitor
    monkeypatch.setattr(metrics, "_hacking_monitor", lambda ax, records: (seen.append(records), original(ax, records)))
    records = [
        {"step": s, "reward/rm/active": float(s >= 2), "rollout/response_len_mean": 10.0 + s, "eval/accuracy": 0.5}
        for s in range(5)
    ]
    for r in records[2:]:
        r["reward/rm/helpful/mean"] = 0.1 * r["step"]
    metrics.plot_metrics(records, tmp_path / "m.png")
    assert len(seen) == 1 and (tmp_path / "m.png").is_file()
    seen.clear()
    metrics.plot_metrics([{k: v for k, v in r.items() if not k.startswith("reward/rm/helpful")} for r in records],
                         tmp_path / "n.png")  # fmt: skip
    assert not seen  # no reward model score, no panel
    assert HACKING_PANEL == "reward hacking monitor"


class _RuleHandle:
    """The reward workers' answer for the rows that have rule rewards."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def result(self, timeout=None) -> RewardBatch:
        n = len(self.scores)
        return RewardBatch(self.scores, {"format": list(self.scores)}, {"format": [None] * n}, {"reward/mean": 9.0})


def test_a_row_reward_is_the_weighted_sum_of_its_rule_and_model_rewards(tmp_path, rm_dir):
    """A general route with a rule reward beside two models (a pairwise one against the reference, a pointwise one):
    each row's reward is its rule reward plus the weighted model scores, read back by calling the judges alone."""
    root = tmp_path / "safety"
    src = make_tiny_hf_model("qwen2", root / "body", seed=2)
    safety = RewardModel.from_pretrained(src, fmt=RewardFormat(kind="pointwise", input="single"))
    safety.reset_head(5)
    with torch.no_grad():
        safety.score.weight.mul_(50)
    safety.save_pretrained(root / "rm", transformers.AutoTokenizer.from_pretrained(src))
    routes = "rewards.routes={math: {math_accuracy: 1.0}, general: {format: 0.5, 'rm:helpful': 2.0, 'rm:safe': 0.25}}"
    cfg = _config(tmp_path, routes, "reward_models.helpful.pairing=reference", f"reward_models.safe.path={root / 'rm'}",
                  "rewards.model_rewards_from_step=3", rm=rm_dir)  # fmt: skip
    rewards = ModelRewards(cfg, RewardRoutes(cfg.rewards.weights, cfg.rewards.routes), "cpu")
    try:
        assert type(rewards.judges["helpful"]).__name__ == "PairwiseHelpfulness"
        assert type(rewards.judges["safe"]).__name__ == "PointwiseSafety"  # kind auto: read from the checkpoint
        problems = [Problem("2 + 2?", "4", "math"), Problem("Say hi.", "Hello there.", "general")]
        rows = [problems[0], problems[0], problems[1], problems[1]]
        texts = ["4", "5", "hi", "<think>greet</think> Hello!"]
        owner = [0, 0, 1, 1]
        off = rewards.submit(_RuleHandle([1.0, 0.0, 1.0, 0.0]), [0, 1, 2, 3], texts, rows, owner, step=2).result()
        assert off.scores == [1.0, 0.0, 1.0, 0.0] and off.metrics["reward/rm/active"] == 0.0
        on = rewards.submit(_RuleHandle([1.0, 0.0, 1.0, 0.0]), [0, 1, 2, 3], texts, rows, owner, step=3).result()
        helpful = rewards.judges["helpful"](["Say hi."], [texts[2:]], ["Hello there."])[0]
        safe = rewards.judges["safe"](["Say hi.", "Say hi."], texts[2:])
        expected = [1.0, 0.0, 1.0 + 2.0 * helpful[0] + 0.25 * safe[0], 2.0 * helpful[1] + 0.25 * safe[1]]
        assert on.scores == pytest.approx(expected)
        assert on.metrics["reward/rm/helpful/mean"] == pytest.approx(sum(helpful) / 2)
        assert on.metrics["reward/rm/safe/mean"] == pytest.approx(sum(safe) / 2)
        assert on.metrics["reward/source/math/mean"] == pytest.approx(0.5)
        assert on.metrics["reward/source/general/mean"] == pytest.approx(sum(expected[2:]) / 2)
        assert on.metrics["reward/mean"] == pytest.approx(sum(expected) / 4)  # the combined reward, not the rule one
    finally:
        rewards.close()
