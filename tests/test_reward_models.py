"""Reward models in the inference module (issue 19, items 1-2): the scalar head on a policy body, Hugging Face
`*ForSequenceClassification` directories in and out against transformers, packed against padded scoring, the A/B swap
against a known position bias, the pairings, the reasoning-block rule, safety over whole responses, the tokenizer
decision (re-tokenise from text) and the errors on bad input."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyConfig, PolicyModel, build_char_tokenizer
from r1engine.models.tiny_hf import build_bpe_tokenizer, make_tiny_hf_model, tiny_config
from r1engine.reward_models import (
    PairwiseHelpfulness,
    PointwiseSafety,
    RewardFormat,
    RewardModel,
    RewardScorer,
    final_summary,
    group_rewards,
    score_sequences,
)
from r1engine.reward_models.routing import check_routes, rows_by_model, split_weights
from r1engine.reward_models.scoring import single_input_judge, swap_averaged
from r1engine.rewards.routing import RewardRoutes

transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen2", "llama", "qwen3")


def _random_ids(vocab: int, lengths: list[int], seed: int, low: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=gen) for n in lengths]


def _tiny_rm(num_labels: int = 1, fmt: RewardFormat | None = None, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    rm = RewardModel(PolicyConfig.tiny(vocab_size=128), num_labels, fmt)
    rm.body.reset_parameters(seed)
    rm.reset_head(seed + 1)
    with torch.no_grad():  # a head as large as a trained one, so that scores differ visibly between inputs
        rm.score.weight.mul_(50)
    return rm.eval()


@pytest.fixture(scope="module")
def hf_classifiers(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """A tiny random `*ForSequenceClassification` directory per family and head size, written by transformers."""
    root = tmp_path_factory.mktemp("rm-hf")
    out = {}
    for family in FAMILIES:
        tok = build_bpe_tokenizer("llama" if family == "llama" else "qwen")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for n in (1, 2):
            config = tiny_config(family, vocab_size=len(tok), pad_token_id=pad, num_labels=n)
            torch.manual_seed(11 + n)
            model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.add_(torch.randn_like(p) * 0.1)
            path = root / f"{family}-{n}"
            model.save_pretrained(path)
            tok.save_pretrained(path)
            out[family, n] = path
    return out


# ------------------------------------------------------------------------------------------------ the model
def test_head_reads_the_last_token_of_each_packed_sequence():
    rm = _tiny_rm()
    seqs = _random_ids(128, [9, 1, 33, 17], seed=1)
    cu = torch.tensor([0, 9, 10, 43, 60], dtype=torch.int32)
    with torch.no_grad():
        packed = rm(torch.cat(seqs), cu)
        alone = [rm.score(rm.body(s[None]).hidden[0, -1]) for s in seqs]
    assert packed.shape == (4, 1) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert packed.std() > 0.1  # the inputs are told apart
    # the head and the body train: both get gradients from a score
    rm.train()
    rm(torch.cat(seqs), cu).sum().backward()
    assert rm.score.weight.grad.abs().sum() > 0
    assert rm.body.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert not any(n.startswith("body.lm_head") for n, _ in rm.named_parameters())


def test_from_policy_keeps_the_body_and_drops_the_mtp_layers():
    policy = PolicyModel(PolicyConfig.tiny(vocab_size=128, num_mtp_layers=1))
    policy.reset_parameters(3)
    rm = RewardModel.from_policy(policy, seed=4)
    assert rm.config.num_mtp_layers == 0 and rm.num_labels == 1
    ids = _random_ids(128, [21], seed=2)[0]
    with torch.no_grad():
        expect = rm.score(policy(ids[None]).hidden[0, -1])
        got = rm(ids, torch.tensor([0, 21]))[0]
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_labels", [1, 2])
def test_sequence_classifier_logits_equal_transformers(hf_classifiers, family, num_labels):
    path = hf_classifiers[family, num_labels]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    rm = RewardModel.from_pretrained(path).eval()
    assert rm.num_labels == num_labels and rm.config.family == family
    assert rm.fmt == RewardFormat(kind="pairwise" if num_labels == 1 else "pointwise", input="single")
    pad = hf.config.pad_token_id
    seqs = [s[s != pad] for s in _random_ids(rm.config.vocab_size, [37, 1, 90, 12, 5], seed=5)]
    with torch.no_grad():
        ours = score_sequences(rm, seqs, token_budget=64)  # several packed forwards
        singles = torch.cat([hf(s[None]).logits for s in seqs])
        # transformers' own batched, right-padded forward reads each row's last non-pad token
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), pad)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)], mask[i, : len(s)] = s, 1
        padded = hf(batch, attention_mask=mask).logits
    assert (ours - singles).abs().max() <= 2e-5 * max(1.0, singles.abs().max().item())
    assert (ours - padded).abs().max() <= 2e-5 * max(1.0, padded.abs().max().item())


def test_trailing_pad_tokens_are_skipped_as_transformers_does(hf_classifiers):
    path = hf_classifiers["qwen2", 1]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    scorer = RewardScorer.from_pretrained(path)
    pad = scorer.model.pad_token_id
    ids = [i for i in _random_ids(scorer.model.config.vocab_size, [15], seed=3)[0].tolist() if i != pad]
    with torch.no_grad():
        expect = hf(torch.tensor([ids + [pad, pad]])).logits[0]  # transformers: the last token that is not pad
        plain = scorer.score_ids([ids])[0]
    got = scorer.score_ids([scorer._fit(ids + [pad, pad])])[0]
    torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, plain)


@pytest.mark.parametrize("mode", ["padded", "padded_sorted"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_packed_and_padded_scores_are_equal(mode, dtype, tol):
    rm = _tiny_rm(num_labels=2, fmt=RewardFormat(kind="pointwise", input="single")).to(dtype)
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 120, (29,), generator=gen).tolist()
    seqs = _random_ids(128, lengths, seed=8)
    packed = score_sequences(rm, seqs, token_budget=256, mode="packed")
    padded = score_sequences(rm, seqs, token_budget=256, mode=mode)
    assert packed.shape == (29, 2)
    scale = packed.abs().max().item()
    assert (packed - padded).abs().max().item() <= tol * max(1.0, scale)
    # the budget only changes how the sequences are grouped, not their scores
    torch.testing.assert_close(score_sequences(rm, seqs, token_budget=100_000), packed, atol=tol * scale, rtol=0)


def test_saved_reward_model_loads_in_transformers_with_the_same_scores(tmp_path):
    tok = build_char_tokenizer()
    rm = _tiny_rm(fmt=RewardFormat(kind="pairwise", input="pair", template="plain"))
    rm.save_pretrained(tmp_path / "rm", tok)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 1
    seqs = _random_ids(128, [13, 40, 2], seed=9, low=4)  # no pad token (0) inside
    with torch.no_grad():
        ours = score_sequences(rm, seqs)
        theirs = torch.cat([hf(s[None]).logits for s in seqs])
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    back = RewardModel.from_pretrained(tmp_path / "rm")
    assert back.fmt == rm.fmt  # how to use it travels with the checkpoint
    torch.testing.assert_close(score_sequences(back, seqs), ours)
    assert (tmp_path / "rm" / "tokenizer.json").is_file()


def test_a_llama_policy_directory_becomes_a_reward_model_and_round_trips(tmp_path):
    src = make_tiny_hf_model("llama", tmp_path / "policy", seed=2, tie_word_embeddings=True)
    policy = PolicyModel.from_pretrained(src)
    rm = RewardModel.from_pretrained(src, fmt=RewardFormat(kind="pointwise", input="single"), seed=5)
    assert rm.config.family == "llama" and rm.num_labels == 1
    ids = _random_ids(rm.config.vocab_size, [17], seed=4, low=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, torch.tensor([0, 17]))[0], rm.score(policy(ids[None]).hidden[0, -1]))
    rm.save_pretrained(tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids[None]).logits[0], rm(ids, torch.tensor([0, 17]))[0], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------ pairwise
def _quality_judge(quality: dict[str, float], bias: float, calls: list[int] | None = None):
    """A judge with a known position bias: f(first, second) = q(first) - q(second) + bias."""

    def judge(prompts, firsts, seconds):
        if calls is not None:
            calls.append(len(firsts))
        return torch.tensor([quality[a] - quality[b] + bias for a, b in zip(firsts, seconds, strict=True)])

    return judge


def test_swapping_a_and_b_removes_a_position_bias():
    quality = {"x": 0.3, "y": -0.4, "z": 1.1}
    judge = _quality_judge(quality, bias=2.5)
    a, b = ["x", "y", "z", "x"], ["y", "z", "x", "x"]
    one_way = judge(["p"] * 4, a, b)
    assert (one_way > 0).all()  # judged one way only, A always "wins": the bias swamps the texts
    pref = swap_averaged(judge, ["p"] * 4, a, b)
    torch.testing.assert_close(pref, torch.tensor([0.7, -1.5, 0.8, 0.0]))


def test_a_pair_input_model_gives_antisymmetric_preferences():
    tok = build_char_tokenizer()
    scorer = RewardScorer(_tiny_rm(fmt=RewardFormat(input="pair", template="plain")), tok)
    helpful = PairwiseHelpfulness(scorer)
    a, b = ["Paris is the capital.", "It is Paris!", "no idea"], ["no idea", "Paris is the capital.", "no idea"]
    ab = swap_averaged(helpful.judge, ["Capital of France?"] * 3, a, b)
    ba = swap_averaged(helpful.judge, ["Capital of France?"] * 3, b, a)
    torch.testing.assert_close(ab, -ba)
    assert abs(float(ab[2])) < 1e-5 and ab[:2].abs().min() > 1e-3
    # the raw verdicts do depend on the position (a random model has a position bias), the averaged ones do not
    raw = helpful.judge(["Capital of France?"] * 2, [a[0], b[0]], [b[0], a[0]])
    assert not torch.allclose(raw[0], -raw[1])


@pytest.mark.parametrize("transform", ["prob", "logit"])
def test_pairings(transform):
    quality = {"a": 2.0, "b": 0.5, "c": -1.0, "d": 1.0, "e": 0.0, "ref": 0.7, "f": -0.5, "g": 0.2}
    groups = [["a", "b", "c", "d", "e"], ["f", "g"]]
    t = torch.sigmoid if transform == "prob" else (lambda x: x)
    calls: list[int] = []
    judge = _quality_judge(quality, bias=-3.0, calls=calls)

    rr = group_rewards(judge, ["p", "q"], groups, pairing="round_robin", transform=transform)
    assert rr.pairs_judged == 10 + 1 and calls == [2 * 11]  # all pairs of all groups in one call, both ways
    for g, group in enumerate(groups):
        for i, x in enumerate(group):
            expect = torch.stack([t(torch.tensor(quality[x] - quality[y])) for y in group if y != x]).mean()
            assert rr.rewards[g][i] == pytest.approx(float(expect), abs=1e-6)

    ref = group_rewards(judge, ["p", "q"], groups, pairing="reference", references=["ref", "ref"], transform=transform)
    assert ref.pairs_judged == 7
    for g, group in enumerate(groups):
        assert ref.rewards[g] == pytest.approx([float(t(torch.tensor(quality[x] - 0.7))) for x in group], abs=1e-6)

    calls.clear()
    best = group_rewards(judge, ["p", "q"], groups, pairing="best_of_group", transform=transform)
    assert best.best == [0, 1]  # "a" and "g"
    assert len(calls) == 4  # three knockout rounds (the longest group has five), then everyone against the best
    assert best.pairs_judged <= 2 * (5 - 1) + 2 * (2 - 1)
    tie = 0.5 if transform == "prob" else 0.0
    assert best.rewards[0][0] == pytest.approx(tie) and best.rewards[1][1] == pytest.approx(tie)
    for i, x in enumerate(groups[0][1:], start=1):
        assert best.rewards[0][i] == pytest.approx(float(t(torch.tensor(quality[x] - 2.0))), abs=1e-6)


def test_a_group_of_one_and_ties():
    judge = _quality_judge({"x": 1.0, "y": 1.0}, bias=0.4)
    assert group_rewards(judge, ["p"], [["x"]]).rewards == [[0.5]]
    out = group_rewards(judge, ["p"], [["x", "y"]], pairing="best_of_group")
    assert out.best == [0] and out.rewards == [[0.5, 0.5]]  # a tie is won by the earlier response


def test_single_input_judge_scores_each_response_once():
    seen: list[tuple[str, ...]] = []

    def score(prompts, responses):
        seen.append(tuple(responses))
        return torch.tensor([float(len(r)) for r in responses])

    judge = single_input_judge(score)
    out = group_rewards(judge, ["p"], [["aa", "bbbb", "c"]], pairing="round_robin", transform="logit")
    assert sorted(seen[0]) == ["aa", "bbbb", "c"]  # three distinct responses, scored once for three pairs
    assert out.rewards[0] == pytest.approx([(0 + -2 + 1) / 2, (2 + 3) / 2, (-1 + -3) / 2])


def test_pairing_errors_name_the_argument():
    judge = _quality_judge({"x": 0.0, "y": 0.0}, 0.0)
    with pytest.raises(ValueError, match="pairing: must be one of reference, round_robin, best_of_group"):
        group_rewards(judge, ["p"], [["x"]], pairing="league")
    with pytest.raises(ValueError, match=r"references\[1\]: pairing 'reference' needs a reference response"):
        group_rewards(judge, ["p", "q"], [["x"], ["y"]], pairing="reference", references=["x", None])
    with pytest.raises(ValueError, match="references: pairing 'reference' needs one reference per group"):
        group_rewards(judge, ["p"], [["x"]], pairing="reference")
    with pytest.raises(TypeError, match=r"groups\[0\]\[1\]: expected a str response"):
        group_rewards(judge, ["p"], [["x", None]])


# ------------------------------------------------------------------------------------------------ the texts
def test_final_summary_rule():
    assert final_summary("<think>2+2 is 4</think>\n The answer is 4. ") == "The answer is 4."
    # the text after the last closing tag: nothing of the reasoning is shown
    assert final_summary("<think>a</think> draft </think> final") == "final"
    # reasoning that never closes (cut off by the length limit) has no summary
    assert final_summary("<think>still thinking about it") == ""
    # no reasoning block at all: all of it is the summary
    assert final_summary("  Just an answer.  ") == "Just an answer."
    assert final_summary("<think>x</think>") == ""


def test_chat_rendering_puts_the_comparison_in_the_user_turn():
    from r1engine.reward_models.text import Renderer

    tok = build_bpe_tokenizer("qwen")
    chat = Renderer(tok, "auto")
    assert chat.chat
    text = tok.decode(
        chat.pair([{"role": "system", "content": "Be fair."}, {"role": "user", "content": "2+2?"}], "4", "5")
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "system: Be fair.\nuser: 2+2?" in text and text.index("[Response A]\n4") < text.index("[Response B]\n5")
    single = tok.decode(chat.single("2+2?", "4"))
    assert single == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    plain = Renderer(build_char_tokenizer(), "auto")
    assert not plain.chat and plain.single("q", "a")[0] == 1  # the character tokenizer's <bos>
    with pytest.raises(ValueError, match="template: 'chat' needs a tokenizer with a chat template"):
        Renderer(build_char_tokenizer(), "chat")


def test_helpfulness_judges_only_the_summary_and_safety_the_whole_response():
    tok = build_char_tokenizer()
    helpful = PairwiseHelpfulness(RewardScorer(_tiny_rm(fmt=RewardFormat(input="pair", template="plain")), tok))
    a1 = "<think>Let me add 2 and 2.</think> It is 4."
    a2 = "<think>Something else entirely, at length.</think>It is 4."
    b = "<think>hmm</think> Five."
    rewards = helpful(["2+2?"], [[a1, b, a2]])[0]
    assert rewards[0] == pytest.approx(rewards[2], abs=1e-6)  # same summary, same reward
    assert rewards[0] != pytest.approx(rewards[1], abs=1e-4)
    whole = PairwiseHelpfulness(helpful.scorer, summary_only=False)(["2+2?"], [[a1, b, a2]])[0]
    assert whole[0] != pytest.approx(whole[2], abs=1e-4)

    safety = PointwiseSafety(RewardScorer(_tiny_rm(fmt=RewardFormat(kind="pointwise", input="single"), seed=3), tok))
    p = safety(["2+2?"] * 2, [a1, a2])
    assert all(0 < x < 1 for x in p) and p[0] != pytest.approx(p[1], abs=1e-4)  # the reasoning counts
    logits = PointwiseSafety(safety.scorer, transform="logit")(["2+2?"] * 2, [a1, a2])
    assert torch.sigmoid(torch.tensor(logits)).tolist() == pytest.approx(p, abs=1e-6)


def test_two_logit_safety_classifier_reads_the_safe_label(hf_classifiers):
    scorer = RewardScorer.from_pretrained(hf_classifiers["llama", 2])
    scorer.model.id2label = {0: "SAFE", 1: "unsafe"}
    logits = scorer.single_logits(["q"], ["an answer"])
    p = PointwiseSafety(scorer)(["q"], ["an answer"])[0]
    assert p == pytest.approx(float(torch.softmax(logits, -1)[0, 0]), abs=1e-6)


def test_the_reward_model_reads_text_with_its_own_tokenizer(tmp_path):
    """Decision: a reward model re-tokenises text with its own tokenizer; it never reads the policy's ids."""
    policy_tok = build_char_tokenizer()
    src = make_tiny_hf_model("qwen2", tmp_path / "rm-body", seed=1)  # a BPE tokenizer, another vocabulary
    RewardModel.from_pretrained(src, fmt=RewardFormat(kind="pointwise", input="single")).save_pretrained(
        tmp_path / "rm", transformers.AutoTokenizer.from_pretrained(src)
    )
    scorer = RewardScorer.from_pretrained(tmp_path / "rm")
    response = "The answer is 42."
    policy_ids = policy_tok.encode(response, add_special_tokens=False)
    text = policy_tok.decode(policy_ids)  # what the rollout hands the rewards
    rm_ids = scorer.encode_single("What is 6 x 7?", text)
    assert rm_ids == scorer.renderer.single("What is 6 x 7?", response)
    assert policy_ids != rm_ids[-len(policy_ids) :]  # the policy's ids would be the wrong tokens here
    safety = PointwiseSafety(scorer)
    assert safety(["What is 6 x 7?"], [text]) == pytest.approx([float(torch.sigmoid(scorer.score_ids([rm_ids])[0, 0]))])


def test_a_tokenizer_that_does_not_fit_the_reward_model_is_refused(tmp_path):
    rm = _tiny_rm()
    rm.save_pretrained(tmp_path / "rm")
    big = build_bpe_tokenizer("qwen", vocab_size=300)  # more tokens than the model's 128 embeddings
    big.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"rm\.helpful\.tokenizer: the tokenizer has 30\d tokens but the model"):
        RewardScorer.from_pretrained(tmp_path / "rm", tokenizer=tmp_path / "tok", key="rm.helpful")
    with pytest.raises(ValueError, match="input_ids must lie in"):
        score_sequences(rm, [torch.tensor([5, 200])])


def test_long_inputs_keep_their_end():
    tok = build_char_tokenizer()
    scorer = RewardScorer(_tiny_rm(fmt=RewardFormat(kind="pointwise", input="single", template="plain")), tok,
                          max_length=24)  # fmt: skip
    ids = scorer.encode_single("a long prompt " * 5, "the end")
    assert len(ids) == 24 and scorer.truncated == 1
    assert tok.decode(ids).endswith("the end")


def test_submit_scores_on_the_scorer_thread():
    tok = build_char_tokenizer()
    safety = PointwiseSafety(RewardScorer(_tiny_rm(fmt=RewardFormat(kind="pointwise", input="single")), tok))
    prompts, responses = ["q"] * 5, [f"answer {i}" for i in range(5)]
    threads = []

    def scored_where():
        threads.append(threading.current_thread().name)
        return safety(prompts, responses)

    with safety.scorer:
        future = safety.scorer.submit(scored_where)
        assert future.result(timeout=60) == safety(prompts, responses)
        helpful_scorer = RewardScorer(_tiny_rm(fmt=RewardFormat(input="pair", template="plain")), tok)
        helpful = PairwiseHelpfulness(helpful_scorer, pairing="best_of_group")
        fut = helpful.submit(["q"], [responses])
        assert fut.result(timeout=60).rewards == helpful(["q"], [responses])
        helpful_scorer.close()
    assert threads and threads[0].startswith("rm-") and threads[0] != threading.current_thread().name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_scorer_holds_the_device_only_while_scoring():
    tok = build_char_tokenizer()
    scorer = RewardScorer(_tiny_rm(fmt=RewardFormat(kind="pointwise", input="single")), tok, device="cuda",
                          offload=True)  # fmt: skip
    assert scorer.model.device.type == "cpu"
    on_gpu = scorer.single_logits(["q"], ["a"])
    assert scorer.model.device.type == "cpu"
    cpu = RewardScorer(scorer.model, tok).single_logits(["q"], ["a"])
    torch.testing.assert_close(on_gpu, cpu, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def test_reward_model_errors_name_what_is_wrong(tmp_path, hf_classifiers):
    with pytest.raises(FileNotFoundError, match=r"rm\.safety: '.*nowhere' does not exist"):
        RewardModel.from_pretrained(tmp_path / "nowhere", key="rm.safety")
    with pytest.raises(ValueError, match=r"rm\.safety: the checkpoint's head has num_labels=2, but 1 were asked"):
        RewardModel.from_pretrained(hf_classifiers["qwen3", 2], num_labels=1, key="rm.safety")
    with pytest.raises(ValueError, match="num_labels: a pairwise .* has one output, got 2"):
        RewardModel.from_pretrained(hf_classifiers["qwen3", 2], fmt=RewardFormat(kind="pairwise", input="single"))
    with pytest.raises(ValueError, match="input: a pointwise classifier reads single responses"):
        RewardFormat(kind="pointwise", input="pair")
    tok = build_char_tokenizer()
    classifier = RewardScorer(_tiny_rm(fmt=RewardFormat(kind="pointwise", input="single")), tok, name="rm:safety")
    with pytest.raises(ValueError, match="rm:safety: helpfulness needs a pairwise reward model, this one is pointwise"):
        PairwiseHelpfulness(classifier)
    with pytest.raises(ValueError, match="rm:safety: a single-input reward model has no pair inputs"):
        classifier.pair_logits(["q"], ["a"], ["b"])
    with pytest.raises(ValueError, match=r"seqs\[1\]: expected a non-empty 1-D sequence"):
        score_sequences(classifier.model, [[1, 2], []])


def test_a_route_naming_a_missing_reward_model():
    routes = RewardRoutes({"math_accuracy": 1.0}, {"chat": {"rm:helpfulness": 1.0}, "harm": {"rm:safety": 0.5}})
    assert split_weights({"format": 1, "rm:safety": 0.5}) == ({"format": 1.0}, {"safety": 0.5})
    check_routes(routes, {"helpfulness", "safety"})
    with pytest.raises(ValueError, match=r"rewards\.routes\.harm\.rm:safety: no reward model named 'safety' is loaded "
                                         r"\(loaded: helpfulness\)"):  # fmt: skip
        check_routes(routes, {"helpfulness"})
    sources = ["gsm8k", "chat", "harm", "chat"]
    assert rows_by_model(sources, routes, {"helpfulness", "safety"}) == {"helpfulness": [1, 3], "safety": [2]}
    with pytest.raises(ValueError, match=r"row 2 \(source 'harm'\): its route rewards\.routes\.harm names reward "
                                         r"model 'safety', which is not loaded"):  # fmt: skip
        rows_by_model(sources, routes, {"helpfulness"})


def test_single_input_helpfulness_scores_each_response_once_and_reports_the_raw_score():
    """best_of_group compares the same responses in several rounds: one model call per distinct response; the raw
    score mean is reported beside the pairwise rewards (whose group mean is fixed by construction)."""
    tok = build_char_tokenizer()
    scorer = RewardScorer(_tiny_rm(fmt=RewardFormat(input="single", template="plain")), tok)
    calls: list[int] = []
    original = scorer.single_logits
    scorer.single_logits = lambda p, r: (calls.append(len(r)), original(p, r))[1]
    helpful = PairwiseHelpfulness(scorer, pairing="best_of_group")
    group = ["It is 4.", "Five.", "Four, I think.", "<think>x</think>It is 4.", "No idea."]
    out = helpful.score_groups(["2+2?"], [group])
    assert sum(calls) == 4  # four distinct summaries ("It is 4." twice), each scored once across the rounds
    expected = original(["2+2?"] * 4, ["It is 4.", "Five.", "Four, I think.", "No idea."])[:, 0]
    assert out.metrics["helpfulness/score_mean"] == pytest.approx(float(expected[[0, 1, 2, 0, 3]].mean()), abs=1e-5)
    round_robin = PairwiseHelpfulness(scorer).score_groups(["2+2?"], [group])
    assert round_robin.metrics["helpfulness/mean"] == pytest.approx(0.5)  # fixed whatever the responses
