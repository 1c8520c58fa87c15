"""Data sets from files (JSONL, JSON, parquet, CSV, save_to_disk; verl's and TRL's layouts as they are), the held-out
split, epochs and exact resume, prompt templates, long prompts, the built-in generators, and errors that name the
key, the file and the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1engine.data import CountdownTask, DataError, DatasetTask, NumberedStream, PromptTemplate, TemplateError
from r1engine.data.dataset import read_problems
from r1engine.data.word_problems import generate, to_rows, write
from r1engine.rewards import get_reward

datasets = pytest.importorskip("datasets")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def trl_file(tmp_path) -> Path:
    return write(tmp_path / "trl.jsonl", to_rows(generate(60, seed=1), "trl"))


@pytest.fixture
def verl_file(tmp_path) -> Path:
    return write(tmp_path / "verl.parquet", to_rows(generate(60, seed=2), "verl"))


def test_trl_jsonl_and_verl_parquet_read_as_they_are(trl_file, verl_file):
    trl = read_problems([str(trl_file)], key="data.train_files")
    verl = read_problems([str(verl_file)], key="data.train_files")
    assert len(trl) == len(verl) == 60
    assert isinstance(trl[0].prompt, str) and trl[0].answer == str(generate(60, seed=1)[0][1])
    assert verl[0].prompt == [{"role": "user", "content": generate(60, seed=2)[0][0]}]
    assert verl[0].answer == str(generate(60, seed=2)[0][1])  # reward_model.ground_truth, found without a key
    assert {p.source for p in trl + verl} == {"word_problems"}  # data_source
    assert verl[0].extra["ability"] == "math" and "extra_info" in verl[0].extra and "prompt" not in verl[0].extra


def test_several_files_csv_json_gzip_and_save_to_disk(tmp_path, trl_file):
    rows = [{"question": f"q{i}", "answer": {"value": i}, "kind": "x"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list([{"question": "c", "answer": {"value": 9}, "kind": "y"}]).to_csv(str(tmp_path / "a.csv"))
    import gzip

    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    files = [str(tmp_path / "disk"), str(tmp_path / "rows.json"), str(tmp_path / "rows.jsonl.gz")]
    problems = read_problems(files, key="data.train_files", prompt_key="question", answer_key="answer.value")
    assert [p.answer for p in problems] == [0, 1, 2, 3, 4] * 3
    assert problems[0].extra == {"kind": "x"}
    multi = read_problems(files[:1], key="k", prompt_key="question", answer_key=["answer.value", "kind"])
    assert multi[2].answer == {"value": 2, "kind": "x"}  # several columns reach the rewards as one dict


def test_held_out_split_is_fixed_disjoint_and_never_trained_on(trl_file):
    a = DatasetTask([str(trl_file)], eval_size=10)
    b = DatasetTask([str(trl_file)], eval_size=10)
    assert [p.prompt for p in a.eval_problems] == [p.prompt for p in b.eval_problems]
    held = {p.prompt for p in a.eval_problems}
    assert len(held) == 10 and not held & {p.prompt for p in a.train} and len(a.train) == 50
    seen = {p.prompt for p in a.train_problems(seed=3).take(200)}  # four epochs
    assert seen == {p.prompt for p in a.train}


def test_epochs_reshuffle_and_resume_exactly(trl_file):
    task = DatasetTask([str(trl_file)], eval_size=10)
    stream = task.train_problems(seed=7)
    first = [p.prompt for p in stream.take(50)]
    second = [p.prompt for p in stream.take(50)]
    assert sorted(first) == sorted(second) and first != second and stream.epoch == 1
    stream.take(13)
    state = stream.state()
    rest = [p.prompt for p in stream.take(60)]
    again = task.train_problems(seed=7)
    again.set_state(state)
    assert [p.prompt for p in again.take(60)] == rest
    assert [p.prompt for p in task.train_problems(seed=7).take(50)] == first  # the order comes from the seed


def test_numbered_stream_resumes_past_problems_trained_out_of_order(trl_file):
    """The off-policy modes' order: batches taken ahead, DAPO's extra rounds behind them and trained first. A resume
    from the position after the last trained batch gives the batches in flight again and passes over the extra
    rounds already trained: every problem is trained once, none is skipped."""
    task = DatasetTask([str(trl_file)], eval_size=10)
    stream = NumberedStream(task.train_problems(seed=7))
    b0, after_b0 = stream.take(4), stream.state()
    b1, after_b1 = stream.take(4), stream.state()
    e0 = stream.take(3, out_of_order=True)  # step 0 trains b0 + e0 while b1 is in flight
    b2 = stream.take(4)
    e1 = stream.take(2, out_of_order=True)  # step 1 trains b1 + e1 while b2 is in flight
    assert stream.last_numbers == [15, 16]
    saved = stream.checkpoint_state(after_b1)  # the checkpoint of step 1: b2 in flight is not in it
    assert saved["count"] == 8 and saved["pass_over"] == [8, 9, 10, 15, 16]
    assert stream.checkpoint_state(after_b0)["pass_over"] == [8, 9, 10, 15, 16]
    rest = [p.prompt for p in stream.take(20)]

    resumed = NumberedStream(task.train_problems(seed=7))
    resumed.set_state(saved)
    assert [p.prompt for p in resumed.take(4)] == [p.prompt for p in b2]  # the batch that was in flight
    again = resumed.checkpoint_state(resumed.state())  # a checkpoint before the resumed stream reached e1
    assert again["pass_over"] == [15, 16]
    assert [p.prompt for p in resumed.take(20)] == rest
    trained = [p.prompt for p in b0 + e0 + b1 + e1 + b2] + rest
    assert len(trained) == len(set(trained)) == 37  # one epoch has 50 rows: no repeats before it ends

    legacy = NumberedStream(task.train_problems(seed=7))
    legacy.set_state(task.train_problems(seed=7).state())  # a checkpoint saved before the numbering
    assert [p.prompt for p in legacy.take(4)] == [p.prompt for p in b0]


def test_long_prompts_are_dropped_with_a_count_or_refused(trl_file, caplog):
    task = DatasetTask([str(trl_file)], eval_size=10)
    lengths = {p.prompt: len(p.prompt.split()) for p in task.train + task.eval_problems}
    limit = sorted(lengths.values())[len(lengths) // 2]
    longer = sum(n > limit for n in lengths.values())
    stats = task.drop_long_prompts(lambda prompt: lengths[prompt], limit)
    assert stats["data/dropped_train"] + stats["data/dropped_eval"] == longer > 0
    assert all(lengths[p.prompt] <= limit for p in task.train + task.eval_problems)
    assert "dropped" in caplog.text
    strict = DatasetTask([str(trl_file)], eval_size=10)
    with pytest.raises(DataError, match="data.max_prompt_tokens: .* row \\d+ has a \\d+-token prompt"):
        strict.drop_long_prompts(lambda prompt: lengths[prompt], limit, mode="error")


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_file", r"data.train_files: '.*nope.jsonl' does not exist"),
        ("bad_suffix", r"unknown file type"),
        ("no_prompt", r"data.prompt_key: no column 'prompt' in .*rows.jsonl \(columns: question, solution\)"),
        ("no_answer", r"data.answer_key: .*rows.jsonl has none of reward_model.ground_truth, solution, answer"),
        ("named_answer", r"data.answer_key: no column 'result' in .*rows.jsonl \(columns: prompt, solution\)"),
        ("empty_answer", r"data.answer_key: .*rows.jsonl, row 1: the answer \('solution'\) is missing"),
        ("empty_prompt", r"data.prompt_key: .*rows.jsonl, row 2: the prompt \('prompt'\) is empty"),
        ("empty_file", r"data.train_files: .*empty.parquet has no rows"),
        ("eval_size", r"data.eval_size: 5 held-out rows would leave nothing to train on"),
    ],
)
def test_bad_data_is_named(tmp_path, case, match):
    rows = [{"prompt": f"p{i}", "solution": str(i)} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    kwargs: dict = {}
    if case == "missing_file":
        path = tmp_path / "nope.jsonl"
    elif case == "bad_suffix":
        path = tmp_path / "rows.txt"
        path.write_text("x")
    elif case == "no_prompt":
        _jsonl(path, [{"question": r["prompt"], "solution": r["solution"]} for r in rows])
    elif case == "no_answer":
        _jsonl(path, [{"prompt": r["prompt"], "result": r["solution"]} for r in rows])
    elif case == "named_answer":
        _jsonl(path, rows)
        kwargs["answer_key"] = "result"
    elif case == "empty_answer":
        _jsonl(path, [rows[0], {"prompt": "p1", "solution": " "}, *rows[2:]])
    elif case == "empty_prompt":
        _jsonl(path, [*rows[:2], {"prompt": "", "solution": "2"}, *rows[3:]])
    elif case == "empty_file":
        path = tmp_path / "empty.parquet"
        datasets.Dataset.from_dict({"prompt": [], "solution": []}).to_parquet(str(path))
    elif case == "eval_size":
        _jsonl(path, rows)
    with pytest.raises(DataError, match=match):
        DatasetTask([str(path)], eval_size=5 if case == "eval_size" else 1, **kwargs)


def test_templates_render_text_and_messages():
    assert PromptTemplate("plain").render("2+2?") == "2+2?"
    r1 = PromptTemplate("r1_zero").render("2+2?")
    assert r1.startswith("A conversation between User and Assistant.") and r1.endswith("User: 2+2?. Assistant:")
    custom = PromptTemplate("Q: {prompt}\nA: <think>")
    assert custom.render([{"role": "user", "content": "2+2?"}]) == "Q: 2+2?\nA: <think>"
    assert custom.think_in_prompt and not PromptTemplate("r1_zero").think_in_prompt
    chat = PromptTemplate("chat", "Be brief.").render("2+2?")
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "2+2?"}]
    assert PromptTemplate("chat", "Be brief.").render(own) == own  # a row's own system message wins
    zero = PromptTemplate("r1_zero_chat").render(own)
    assert zero[0]["role"] == "system" and "<think>" in zero[0]["content"] and zero[1]["content"] == "2+2?"


@pytest.mark.parametrize(
    "spec,system,match",
    [
        ("Answer this", None, r"data.template: must be one of plain, chat, r1_zero, r1_zero_chat or a string with"),
        ("{prompt} {other}", None, r"data.template: .* has fields other than \{prompt\}"),
        ("plain", "Be brief.", r"data.system_prompt: applies to the chat templates"),
    ],
)
def test_bad_templates_are_named(spec, system, match):
    with pytest.raises(TemplateError, match=match):
        PromptTemplate(spec, system)


def test_countdown_problems_are_solvable():
    task = CountdownTask(num_eval=30)
    reward = get_reward("countdown")
    problems = task.eval_problems + task.train_problems(seed=0).take(30)
    texts = [task.solution(p) for p in problems]
    assert all(r.score == 1.0 for r in reward(texts, [p.answer for p in problems]))
    assert not {p.prompt for p in task.eval_problems} & {p.prompt for p in task.train_problems(seed=1).take(300)}
