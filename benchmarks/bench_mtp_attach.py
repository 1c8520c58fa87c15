"""MTP layers attached to a real pretrained model (SmolLM2-135M-Instruct, which has none): draft acceptance of each
initialisation (`model.mtp_init`: last_layer, random) before and after an MTP warm-up on the model's own samples
(`r1engine.trainer.mtp_warmup`), with the native engine, and for the default initialisation also with vLLM; beside
it the rollout throughput with one speculative token against none, each engine in the same run.

Prompts: the addition task's problems ("What is 17 + 25?") in the model's chat template with the example config's
system prompt; acceptance over 16 held-out prompts x 2 samples, 48 new tokens, temperature 0.7 (the RL sampling of
configs/smollm2.yaml) and greedy. Needs models/SmolLM2-135M-Instruct (bash scripts/fetch_smollm2.sh).

    python benchmarks/bench_mtp_attach.py [--warmup-steps 30] [--no-vllm] [--out benchmarks/results/mtp_attach.md]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, machine  # noqa: E402
from r1engine.data import AdditionTask, PromptTemplate  # noqa: E402
from r1engine.models import PolicyModel  # noqa: E402
from r1engine.models.tokenizer import TextCodec, load_tokenizer  # noqa: E402
from r1engine.rollout import create_engine  # noqa: E402
from r1engine.trainer.mtp_warmup import mtp_warmup  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SYSTEM = "Solve the problem. Put only the final number between <answer> and </answer>."


def question(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return f"What is {a} + {b}?"


def acceptance(engine, prompts, codec, temperature: float, k: int = 1) -> tuple[float, float]:
    """(acceptance rate, tokens/s) of one generation with k speculative tokens."""
    kwargs = {"num_speculative_tokens": k} if engine.backend == "native" else {}
    out = engine.generate(prompts, n=2 if temperature > 0 else 1, max_new_tokens=48, temperature=temperature,
                          stop_token_ids=codec.stop_ids, seed=11, **kwargs)  # fmt: skip
    return out.stats.acceptance_rate, out.stats.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        print(f"skipped: {MODEL} is missing (bash scripts/fetch_smollm2.sh)")
        return
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    codec = TextCodec(tokenizer, template=PromptTemplate("chat", SYSTEM))
    task = AdditionTask(1, 2, num_eval=16)
    held_out = [codec.encode(question(p.prompt)) for p in task.eval_problems]
    train = (codec.encode(question(p.prompt)) for p in task.train_problems(seed=5))
    lines = [
        "# MTP layers attached to SmolLM2-135M-Instruct: draft acceptance before and after warm-up",
        "",
        f"`python benchmarks/bench_mtp_attach.py --warmup-steps {args.warmup_steps}` at commit {git_commit()}, "
        f"{datetime.date.today()}, {machine()}.",
        "",
        "One MTP layer attached to the checkpoint (which has none), k = 1 speculative token. Acceptance = accepted / "
        "drafted over 16 held-out addition prompts in the chat template (x2 samples at T=0.7; x1 greedy), 48 new "
        f"tokens. Warm-up: {args.warmup_steps} steps of the MTP loss alone (body frozen), each on 4 training prompts"
        " x 4 of the model's own samples at T=0.7, AdamW lr 1e-3.",
        "",
        "| engine | mtp_init | acceptance T=0.7 before | after | greedy before | after | warm-up MTP CE first -> last "
        "| warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    warmed: dict[str, PolicyModel] = {}
    for init in ("last_layer", "random"):
        model = PolicyModel.from_pretrained(MODEL, num_mtp_layers=1, mtp_init=init, seed=0).eval()
        engine = create_engine("native", model=model, tokenizer=tokenizer, num_speculative_tokens=1)
        before = acceptance(engine, held_out, codec, 0.7), acceptance(engine, held_out, codec, 0.0)
        t0 = time.perf_counter()
        result = mtp_warmup(
            model, engine, itertools.cycle(list(itertools.islice(train, 4 * args.warmup_steps))),
            steps=args.warmup_steps, lr=1e-3, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=48,
            stop_token_ids=codec.stop_ids, chunk_len=512, seed=1, temperature=0.7, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        after = acceptance(engine, held_out, codec, 0.7), acceptance(engine, held_out, codec, 0.0)
        row = (f"| native | {init} | {before[0][0]:.3f} | {after[0][0]:.3f} | {before[1][0]:.3f} | {after[1][0]:.3f} "
               f"| {result.losses[0]:.2f} -> {result.losses[-1]:.2f} | {seconds:.0f} |")  # fmt: skip
        print(row, flush=True)
        lines.append(row)
        warmed[init] = model
        train = (codec.encode(question(p.prompt)) for p in task.train_problems(seed=5))  # the same data for both
    speed = ["", "Rollout throughput, the warmed-up `last_layer` drafter, greedy, same prompts (tokens/s):", "",
             "| engine | k = 0 | k = 1 | k=1 / k=0 | acceptance |", "|---|---|---|---|---|"]  # fmt: skip
    model = warmed["last_layer"]
    native = create_engine("native", model=model, tokenizer=tokenizer, num_speculative_tokens=1)
    plain = acceptance(native, held_out, codec, 0.0, k=0)[1]
    acc, spec = acceptance(native, held_out, codec, 0.0, k=1)
    speed.append(f"| native | {plain:.0f} | {spec:.0f} | {spec / plain:.2f}x | {acc:.3f} |")
    if not args.no_vllm:
        fresh = PolicyModel.from_pretrained(MODEL, num_mtp_layers=1, mtp_init="last_layer", seed=0).eval()
        vllm = create_engine("vllm", model=fresh, tokenizer=tokenizer, num_speculative_tokens=1, max_model_len=512)
        acceptance(vllm, held_out[:2], codec, 0.0)  # warm-up of the engine itself
        v_before = acceptance(vllm, held_out, codec, 0.7), acceptance(vllm, held_out, codec, 0.0)
        vllm.sync_weights(model)  # the warmed-up MTP layer, through the live weight sync
        v_after = acceptance(vllm, held_out, codec, 0.7), acceptance(vllm, held_out, codec, 0.0)
        row = (f"| vLLM | last_layer | {v_before[0][0]:.3f} | {v_after[0][0]:.3f} | {v_before[1][0]:.3f} "
               f"| {v_after[1][0]:.3f} | (warm-up above, synced) | |")  # fmt: skip
        print(row, flush=True)
        lines.append(row)
        plain_vllm = create_engine("vllm", model=model, tokenizer=tokenizer, num_speculative_tokens=0,
                                   max_model_len=512)  # fmt: skip
        acceptance(plain_vllm, held_out[:2], codec, 0.0)
        v_plain = acceptance(plain_vllm, held_out, codec, 0.0)[1]
        speed.append(f"| vLLM | {v_plain:.0f} | {v_after[1][1]:.0f} | {v_after[1][1] / v_plain:.2f}x "
                     f"| {v_after[1][0]:.3f} |")  # fmt: skip
    lines += speed
    print("\n".join(speed))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
