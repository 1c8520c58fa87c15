"""Training the reward models (issue 19, item 3): the Bradley-Terry and classifier losses, length balancing, the
preference and label files (errors naming the key, the file and the row), gradient accumulation over packed
micro-batches, tiny models learning a hidden rule that length cannot explain (held-out accuracy far above chance,
the checkpoint loading in transformers with the same scores), and `r1engine train-rm`'s one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r1engine.cli import main as cli_main
from r1engine.data import DataError
from r1engine.models import build_char_tokenizer
from r1engine.reward_models import RewardModel, RewardScorer, score_sequences
from r1engine.reward_models.config import ConfigError, load_rm_config
from r1engine.reward_models.data import length_balance, read_labels, read_preferences
from r1engine.reward_models.synthetic import (
    CHOSEN_CLOSING,
    REJECTED_CLOSING,
    preference_rows,
    safety_rows,
    write_jsonl,
)
from r1engine.reward_models.train import (
    RewardModelTrainer,
    bradley_terry_loss,
    build_reward_model,
    preferences,
    train_reward_model,
)

FAST = ["training.num_threads=1", "data.eval_size=32"]


def _cfg(tmp_path, rows, *overrides: str):
    data = write_jsonl(rows, tmp_path / "data.jsonl")
    return load_rm_config(None, [f"data.train_files={data}", f"output_dir={tmp_path / 'run'}", *FAST, *overrides])


# ------------------------------------------------------------------------------------------------ losses
def test_bradley_terry_loss_and_the_preference_layout():
    pref = torch.tensor([-3.0, 0.0, 0.7, 25.0])
    torch.testing.assert_close(bradley_terry_loss(pref), -torch.log(torch.sigmoid(pref)))
    assert bradley_terry_loss(torch.tensor([-200.0])).isfinite().all()  # no overflow far from the boundary
    out = torch.tensor([[2.0], [0.5], [-1.0], [1.0]])  # (chosen side, rejected side) per pair
    torch.testing.assert_close(preferences(out, "single"), torch.tensor([1.5, -2.0]))
    # a pair input's preference is the swap average: half the difference of the two orders' verdicts
    torch.testing.assert_close(preferences(out, "pair"), torch.tensor([0.75, -1.0]))


def test_paper_defaults():
    cfg = load_rm_config(None, ["data.train_files=[x.jsonl]"])
    t = cfg.training
    assert (t.batch_size, t.lr, t.epochs, t.max_length) == (256, 6e-6, 1, 8192)
    assert cfg.kind == "pairwise" and cfg.input_kind == "pair" and cfg.data.length_balance == "weight"
    assert load_rm_config(None, ["data.train_files=[x.jsonl]", "kind=pointwise"]).input_kind == "single"


# ------------------------------------------------------------------------------------------------ length balancing
def test_synthetic_pairs_carry_no_length_signal_unless_skewed():
    rows = preference_rows(400, seed=3)
    assert all(r["chosen"].endswith(CHOSEN_CLOSING) and r["rejected"].endswith(REJECTED_CLOSING) for r in rows)
    assert len(CHOSEN_CLOSING) == len(REJECTED_CLOSING)
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    assert 0.42 < longer < 0.58
    skewed = preference_rows(400, seed=3, length_skew=0.9)
    assert sum(len(r["chosen"]) > len(r["rejected"]) for r in skewed) / 400 > 0.85


@pytest.mark.parametrize("mode", ["weight", "drop"])
def test_length_balance_makes_longer_chosen_as_common_as_shorter_at_every_length_difference(mode):
    rows = preference_rows(600, seed=4, length_skew=0.85)
    lc = torch.tensor([len(r["chosen"]) for r in rows])
    lr = torch.tensor([len(r["rejected"]) for r in rows])
    weights, stats = length_balance(lc, lr, mode, seed=1)
    assert stats["data/chosen_longer_frac"] > 0.8
    assert stats["data/chosen_longer_frac_balanced"] == pytest.approx(0.5)
    ratio = torch.log(lc.double() / lr.double())
    for lo, hi in [(0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 10)]:
        in_bucket = (ratio.abs() > lo) & (ratio.abs() <= hi)
        up, down = float(weights[in_bucket & (ratio > 0)].sum()), float(weights[in_bucket & (ratio < 0)].sum())
        assert up == pytest.approx(down, abs=1e-4), (lo, hi)
    if mode == "drop":
        assert set(weights.unique().tolist()) <= {0.0, 1.0}
    assert stats["data/pairs_left_out"] == float((weights == 0).sum())
    # "the longer response wins" is right on exactly half of the weighted unequal pairs
    unequal = ratio != 0
    assert float((weights * (ratio > 0))[unequal].sum() / weights[unequal].sum()) == pytest.approx(0.5)


def test_length_balance_edge_cases():
    weights, stats = length_balance([10, 10, 30], [10, 20, 10], "weight")
    # equal lengths keep weight 1; a bucket with one side only cannot be balanced and is left out
    assert weights.tolist() == [1.0, 0.0, 0.0] and stats["data/pairs_left_out"] == 2
    same, _ = length_balance([10, 20], [20, 10], "none")
    assert same.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="data.length_balance: must be one of weight, drop, none"):
        length_balance([1], [2], "trim")


# ------------------------------------------------------------------------------------------------ files
def test_preference_and_label_files_read_jsonl_parquet_and_chat_messages(tmp_path):
    import datasets

    rows = preference_rows(5, seed=1)
    rows[2] = {**rows[2], "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "It is 3."}]}
    write_jsonl(rows, tmp_path / "p.jsonl")
    pairs = read_preferences([str(tmp_path / "p.jsonl")])
    assert len(pairs) == 5 and pairs[2].chosen == "It is 3." and pairs[0].chosen == rows[0]["chosen"]
    assert pairs[4].where.endswith("p.jsonl, row 4")
    labels = safety_rows(6, seed=2)
    datasets.Dataset.from_list(labels).to_parquet(str(tmp_path / "s.parquet"))
    got = read_labels([str(tmp_path / "s.parquet")])
    assert [g.safe for g in got] == [r["label"] == "safe" for r in labels]
    mixed = read_labels([[{"prompt": "p", "response": "r", "label": v} for v in (True, 0, "UNSAFE", 1.0)]])
    assert [g.safe for g in mixed] == [True, False, False, True]


def test_bad_rows_name_the_key_the_file_and_the_row(tmp_path):
    good = preference_rows(4, seed=2)
    f = write_jsonl([good[0], {**good[1], "rejected": None}, good[2]], tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"data\.train_files: .*missing\.jsonl, row 1: 'rejected' is missing or empty"):
        read_preferences([str(f)])
    f = write_jsonl([good[0], good[1], {**good[2], "rejected": good[2]["chosen"] + " "}], tmp_path / "equal.jsonl")
    with pytest.raises(DataError, match=r"equal\.jsonl, row 2: 'chosen' and 'rejected' are the same text"):
        read_preferences([str(f)])
    f = write_jsonl([{"prompt": "p", "good": "a", "rejected": "b"}], tmp_path / "cols.jsonl")
    with pytest.raises(
        DataError, match=r"data\.chosen_key: no column 'chosen' in .*cols\.jsonl \(columns: prompt, good, rejected\)"
    ):
        read_preferences([str(f)])
    f = write_jsonl([{"prompt": "p", "response": "r", "label": "maybe"}], tmp_path / "labels.jsonl")
    with pytest.raises(DataError, match=r"data\.eval_files: .*labels\.jsonl, row 0: 'label' must be safe/unsafe"):
        read_labels([str(f)], key="data.eval_files")
    with pytest.raises(DataError, match=r"row 0: 'prompt' is missing or empty"):
        read_labels([[{"prompt": "", "response": "r", "label": 1}]])
    with pytest.raises(DataError, match="does not exist"):
        read_preferences([str(tmp_path / "nope.jsonl")])


# ------------------------------------------------------------------------------------------------ training
def test_micro_batches_accumulate_to_the_same_step(tmp_path):
    """One optimizer step over a batch split into packed micro-batches equals the step over the whole batch."""
    rows = preference_rows(48, seed=5)
    weights = []
    for tokens in (100_000, 300):
        cfg = _cfg(tmp_path / str(tokens), rows, "input=single", "training.batch_size=16", "training.lr=1e-3",
                   f"training.micro_batch_tokens={tokens}", "data.eval_size=16")  # fmt: skip
        trainer = RewardModelTrainer(cfg, progress=False, log=lambda s: None)
        trainer.train = trainer.train[:16]
        summary = trainer.run()
        metrics = [json.loads(line) for line in (tmp_path / str(tokens) / "run" / "metrics.jsonl").open()]
        micro = metrics[1]["train/micro_batches"]
        assert summary["steps"] == 1 and (micro == 1 if tokens > 1000 else micro >= 4)
        weights.append(RewardModel.from_pretrained(summary["model_dir"]).score.weight)
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)


@pytest.mark.timeout(240)
def test_a_tiny_preference_model_learns_the_hidden_rule_not_length(tmp_path):
    import transformers

    rows = preference_rows(224, seed=7)
    cfg = _cfg(tmp_path, rows, "input=single", "training.batch_size=16", "training.lr=1e-3", "training.eval_every=7")
    summary = train_reward_model(cfg, progress=False, log=lambda s: None)
    assert summary["steps"] == math.ceil(summary["train_examples"] / 16)
    assert summary["pairwise_acc"] >= 0.95, summary
    assert summary["loss"] < 0.5 * summary["initial_loss"]
    assert 0.3 < summary["longer_wins_acc"] < 0.7  # length alone is near chance on these pairs
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval/pairwise_acc" in r] == [0, 7, summary["steps"]]
    # the checkpoint is a Hugging Face sequence classifier that scores as the engine does
    model_dir = summary["model_dir"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    scorer = RewardScorer.from_pretrained(model_dir)
    assert scorer.fmt.kind == "pairwise" and scorer.fmt.input == "single"
    ids = [scorer.encode_single(rows[0]["prompt"], rows[0][k]) for k in ("chosen", "rejected")]
    with torch.no_grad():
        theirs = torch.cat([hf(torch.tensor([i])).logits for i in ids])
    torch.testing.assert_close(scorer.score_ids(ids), theirs, atol=1e-4, rtol=1e-4)
    assert theirs[0, 0] > theirs[1, 0]
    # new text, same rule: a polite closing wins whatever the lengths
    from r1engine.reward_models import PairwiseHelpfulness

    helpful = PairwiseHelpfulness(scorer, pairing="round_robin")
    group = [f"5 + 3 = 8. Sums are fun. Go step by step. {REJECTED_CLOSING}", f"5 + 3 = 8. {CHOSEN_CLOSING}"]
    rewards = helpful(["What is 5 + 3?"], [group])[0]
    assert rewards[1] > 0.8 and rewards[0] < 0.2


@pytest.mark.timeout(240)
def test_a_tiny_safety_classifier_learns_safe_from_unsafe(tmp_path):
    rows = safety_rows(256, seed=7)
    cfg = _cfg(tmp_path, rows, "kind=pointwise", "training.batch_size=16", "training.lr=2e-3", "training.epochs=2")
    summary = train_reward_model(cfg, progress=False, log=lambda s: None)
    assert summary["classifier_acc"] >= 0.9, summary
    assert summary["loss"] < 0.5 * summary["initial_loss"]
    from r1engine.reward_models import PointwiseSafety

    safety = PointwiseSafety(RewardScorer.from_pretrained(summary["model_dir"]))
    thought = "<think>The user wants a lamp.</think>"
    p = safety(
        ["How do I make a lamp?"] * 2, [f"{thought} To make a lamp, first get a {w}." for w in ("teacup", "weapon")]
    )
    assert p[0] > 0.7 and p[1] < 0.3


@pytest.mark.timeout(240)
def test_a_pair_input_model_trains_on_swap_averaged_preferences(tmp_path):
    rows = preference_rows(80, seed=8)
    cfg = _cfg(tmp_path, rows, "training.batch_size=16", "training.lr=1e-3", "data.eval_size=16")
    trainer = RewardModelTrainer(cfg, progress=False, log=lambda s: None)
    assert trainer.model.fmt.input == "pair"
    pair = trainer.train[0]
    text = build_char_tokenizer().decode(pair.seqs[0])
    assert text.index(CHOSEN_CLOSING) < text.index(REJECTED_CLOSING)  # the chosen side shows chosen first
    summary = trainer.run()
    assert summary["loss"] < summary["initial_loss"]
    back = RewardModel.from_pretrained(summary["model_dir"])
    assert back.fmt.input == "pair"
    out = score_sequences(back, [s for e in trainer.held for s in e.seqs])
    pref = preferences(out, "pair")
    assert float((pref > 0).float().mean()) == pytest.approx(summary["pairwise_acc"])


def test_overlong_rows_are_left_out_and_counted(tmp_path):
    rows = preference_rows(60, seed=9)
    cfg = _cfg(tmp_path, rows, "input=single", "training.max_length=80", "data.eval_size=8")
    trainer = RewardModelTrainer(cfg, progress=False, log=lambda s: None)
    assert trainer.stats["data/overlong_left_out"] > 0
    assert trainer.train and all(len(s) <= 80 for e in trainer.train for s in e.seqs)
    cfg = _cfg(tmp_path / "all", rows, "input=single", "training.max_length=10", "data.eval_size=8")
    with pytest.raises(DataError, match=r"data\.train_files: no training rows left \(52 longer than training\."):
        RewardModelTrainer(cfg, progress=False)


def test_build_from_a_policy_directory(tmp_path):
    from r1engine.models.tiny_hf import make_tiny_hf_model

    src = make_tiny_hf_model("qwen3", tmp_path / "policy", seed=1)
    cfg = load_rm_config(None, ["data.train_files=[x.jsonl]", f"model.path={src}", "kind=pointwise"])
    model, tok = build_reward_model(cfg)
    assert model.config.family == "qwen3" and model.fmt.kind == "pointwise" and model.num_labels == 1
    assert len(tok) <= model.config.vocab_size


# ------------------------------------------------------------------------------------------------ CLI
def _cli_error(capsys, *argv: str) -> str:
    assert cli_main(["train-rm", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_train_rm_cli_errors_are_one_line(tmp_path, capsys):
    line = _cli_error(capsys)
    assert line == "r1engine: config error: data.train_files: no files given (preference pairs or labelled responses)"
    line = _cli_error(capsys, "data.train_files=[x.jsonl]", "training.lr=0")
    assert line == "r1engine: config error: training.lr: must be a finite value > 0, got 0.0"
    line = _cli_error(capsys, "data.train_files=[x.jsonl]", "training.batch=3")
    assert line.startswith("r1engine: config error: training.batch: unknown key (known: batch_size, ")
    line = _cli_error(capsys, "data.train_files=[x.jsonl]", "kind=pointwise", "input=pair")
    assert "input: a pointwise classifier reads single responses" in line
    line = _cli_error(capsys, "--config", str(tmp_path / "none.yaml"))
    assert line.startswith("r1engine: config error: config file ") and "does not exist" in line
    line = _cli_error(capsys, "data.train_files=[x.jsonl]", f"model.path={tmp_path / 'no-model'}")
    assert line.startswith("r1engine: config error: model.path: ") and "does not exist" in line
    rows = preference_rows(40, seed=1)
    rows[17]["rejected"] = rows[17]["chosen"]
    data = write_jsonl(rows, tmp_path / "prefs.jsonl")
    line = _cli_error(capsys, f"data.train_files={data}", f"output_dir={tmp_path / 'run'}")
    assert line == (
        f"r1engine: data error: data.train_files: {data}, row 17: 'chosen' and 'rejected' are the same text; a "
        "preference pair needs two different responses"
    )


@pytest.mark.timeout(240)
def test_train_rm_cli_trains_and_refuses_to_overwrite(tmp_path, capsys):
    data = write_jsonl(safety_rows(48, seed=3), tmp_path / "safety.jsonl")
    args = [f"data.train_files={data}", f"output_dir={tmp_path / 'run'}", "kind=pointwise", "training.batch_size=16",
            "data.eval_size=8", "training.num_threads=1"]  # fmt: skip
    assert cli_main(["train-rm", "--no-progress", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed["kind"] == "pointwise" and 0 <= printed["classifier_acc"] <= 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    line = _cli_error(capsys, *args)
    assert line.startswith("r1engine: config error: output_dir: ") and "already holds a trained reward model" in line
    with pytest.raises(ConfigError):
        RewardModelTrainer(load_rm_config(None, args), progress=False)
