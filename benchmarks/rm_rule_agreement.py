"""Does a reward model prefer what a rule says it should, on a policy's own samples?

A reward model trained on synthetic pairs has to carry its preference over to the text the policy actually writes
before RL can use it. This samples `--samples` responses per prompt from the policy (as the trainer renders prompts),
checks each with the `pattern` rule, scores each with the reward model (single-input, the score the trainer's
helpfulness reward compares), and reports, over every same-prompt pair of one response that passes the rule and one
that fails it, how often the reward model scores the passing one higher (0.5: no agreement; 1.0: full agreement),
with the rule's pass rate and the ROC AUC of the score against the rule over all responses.

    python benchmarks/rm_rule_agreement.py --policy models/SmolLM2-135M-Instruct \\
        --reward-model runs/r1_general_smollm2/helpfulness_rm/model --prompts data/general/prompts.jsonl \\
        --pattern "\\byou(r|rs|rself|'re|'ll|'d|'ve)?\\b" --system-prompt "..." --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

from r1engine.data.dataset import read_problems
from r1engine.data.templates import PromptTemplate
from r1engine.models.tokenizer import TextCodec, load_tokenizer
from r1engine.reward_models.inference import RewardScorer
from r1engine.reward_models.text import final_summary
from r1engine.rewards import get_reward
from r1engine.rollout import create_engine


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--prompts", required=True, help="a data file (JSONL/parquet) with a prompt column")
    ap.add_argument("--pattern", required=True, help="the rule: a regular expression (the `pattern` reward)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    problems = read_problems([args.prompts], key="--prompts")
    problems = random.Random(args.seed).sample(problems, min(args.num_prompts, len(problems)))
    codec = TextCodec(load_tokenizer(args.policy), template=PromptTemplate(args.template, args.system_prompt))
    engine = create_engine(args.backend, model_dir=args.policy, max_model_len=512)
    t0 = time.perf_counter()
    batch = engine.generate([codec.encode(p.prompt) for p in problems], n=args.samples,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            stop_token_ids=codec.stop_ids, seed=args.seed)  # fmt: skip
    t_sample = time.perf_counter() - t0
    texts = [codec.decode(c) for c in batch.completion_ids]
    owner = batch.prompt_index.tolist()
    rule = [r.score == 1.0 for r in get_reward("pattern", pattern=args.pattern)(texts, [None] * len(texts))]
    with RewardScorer.from_pretrained(args.reward_model) as scorer:
        prompts = [problems[i].prompt for i in owner]
        scores = scorer.single_logits(prompts, [final_summary(t) for t in texts])[:, 0].tolist()
    passing = [s for s, y in zip(scores, rule, strict=True) if y]
    failing = [s for s, y in zip(scores, rule, strict=True) if not y]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    wins = pairs = 0.0
    for i in range(len(problems)):
        rows = [j for j, o in enumerate(owner) if o == i]
        for a in (j for j in rows if rule[j]):
            for b in (j for j in rows if not rule[j]):
                pairs += 1
                wins += (scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b])
    result = {
        "policy": args.policy,
        "reward_model": args.reward_model,
        "commit": commit,
        "responses": len(texts),
        "prompts": len(problems),
        "rule_pass_rate": sum(rule) / len(rule),
        "mixed_pairs": int(pairs),
        "pairwise_agreement": wins / pairs if pairs else float("nan"),
        "auc": auc(scores, rule),
        "score_mean_pass": sum(passing) / len(passing) if passing else float("nan"),
        "score_mean_fail": sum(failing) / len(failing) if failing else float("nan"),
        "sampling_s": t_sample,
    }  # fmt: skip
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "examples": [
            {"text": t, "rule": y, "score": s} for t, y, s in list(zip(texts, rule, scores, strict=True))[:24]
        ]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
