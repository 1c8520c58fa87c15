"""Head to head with TRL's GRPOTrainer: the same model, data, G, lengths and optimizer, on this CPU.

Both frameworks train the same Qwen2-layout policy (`PolicyConfig.demo` body: hidden 192, 3 layers, 6 heads /
2 KV heads, MLP 512, character vocabulary of 101 tokens; no MTP layer, fp32) from the same weights: a cold-start
SFT'd checkpoint written once by r1engine (MiMo layout = a Qwen2 state dict) that `Qwen2ForCausalLM` loads as is
(checked: same logits). Same task and prompts in the same order (`r1engine.data.AdditionTask`, seed 0), same
rewards (`r1engine.rewards` arithmetic + format, weight 1 each), G completions per prompt, max completion length,
temperature, lr (constant, AdamW betas 0.9/0.999, eps 1e-8, no weight decay), grad-norm clip 1.0, beta with k3 KL
against the initial policy (never reset), eps 0.2, loss "grpo" = seq-mean-token-mean, and the same mini-batching:
each rollout of P x G completions is split into `mini_batches` optimizer steps (TRL: `steps_per_generation`), so
both compute old log-probs before the first step.

* r1engine: `r1engine.trainer.GRPOTrainer` (rollouts from the native PyTorch engine without speculation: on this
  CPU it is the fastest backend for a 3-layer model, see benchmarks/results/rollout.md; packing, fused C++ loss,
  rewards scored in one worker process while old/ref log-probs are inferred).
* TRL 1.16: `trl.GRPOTrainer` generating with Hugging Face `generate` (its vLLM path needs CUDA), padded batches,
  its chunked log-prob head, rewards in-process, `bf16=False`, `gradient_checkpointing=False` (TRL's defaults are
  True; both off here so that neither pays for what the other does not), `use_bias_correction_kl=False` (the k3
  KL r1engine computes), `lr_scheduler_type="constant"`.

Each framework runs in its own process with one torch thread. Reported per rollout (P x G completions and
`mini_batches` optimizer steps), after a warm-up rollout: samples/s = completions / wall seconds; peak memory =
the process's peak RSS (`ru_maxrss`) and the peak RSS of the process tree (the reward worker included), sampled
every 10 ms, and what that adds on top of the process right after its imports. PyTorch keeps no statistics of its
CPU allocations, so RSS is the measure.

    python benchmarks/bench_vs_trl.py [--rollouts 12] [--prompts 8] [--group 8] [--max-new-tokens 72] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------------------------
# memory: peak RSS of this process (kernel counter) and of its process tree (sampled)


class TreeRSSSampler:
    """Samples the RSS of this process plus its children every `interval_s` in a thread; keeps the peak."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child that exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeRSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------
# the shared setting


def common_settings(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "prompts_per_rollout": a.prompts,
        "group_size": a.group,
        "mini_batches": a.mini_batches,
        "rollouts": a.rollouts,
        "max_new_tokens": a.max_new_tokens,
        "lr": a.lr,
        "beta": a.beta,
        "eps": 0.2,
        "temperature": 1.0,
        "max_grad_norm": 1.0,
        "loss": "grpo (seq-mean-token-mean)",
        "rewards": "arithmetic + format (r1engine.rewards, weight 1 each)",
        "dtype": "float32",
        "torch_threads": 1,
    }


def problems(n: int):
    from r1engine.data import AdditionTask

    return AdditionTask().train_problems(seed=0).take(n)


def prepare(a: argparse.Namespace) -> None:
    """Cold-start SFT of the shared initial policy (r1engine's SFT), saved where both frameworks load it."""
    import torch

    from r1engine.data import AdditionTask
    from r1engine.models import PolicyConfig, PolicyModel, build_char_tokenizer
    from r1engine.trainer.sft import cold_start_sft

    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = PolicyModel(PolicyConfig.demo(vocab_size=len(tokenizer), num_mtp_layers=0))
    model.reset_parameters(seed=0)
    task = AdditionTask()
    eos = tokenizer.eos_token_id

    def encode(text: str, bos: bool = True) -> list[int]:  # as r1engine's trainer encodes: BOS + characters
        return ([tokenizer.bos_token_id] if bos else []) + tokenizer.encode(text, add_special_tokens=False)

    losses = cold_start_sft(
        model, task, task.train_problems(seed=1), encode, eos, steps=a.sft_steps, batch_size=32, lr=1e-3,
        chunk_len=256, mtp_coef=0.0, progress=False,
    )  # fmt: skip
    model.save_pretrained(a.init_dir, tokenizer)
    hf = check_same_logits(model, a.init_dir, tokenizer)
    # TRL reloads the policy's path for its reference model and resolves `architectures` in transformers, which
    # has no MiMoForCausalLM: give it the same weights under a Qwen2ForCausalLM config.
    hf.save_pretrained(Path(a.init_dir) / "qwen2")
    print(f"prepare: {a.sft_steps} SFT steps, final CE {losses[-1]:.3f}, saved {a.init_dir}")


def check_same_logits(model, init_dir: str, tokenizer):
    """Qwen2ForCausalLM loads the checkpoint and computes the same logits, and TRL's prompt text tokenizes to the
    ids r1engine builds (BOS + characters)."""
    import torch
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(init_dir).eval()
    text = "347+85=<think>7+5+0=12"
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer("<bos>" + text)["input_ids"] == ids, "TRL prompt tokenization differs from r1engine's"
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model.eval()(x).logits, hf(x).logits
    torch.testing.assert_close(ours.reshape(theirs.shape), theirs, rtol=1e-4, atol=1e-4)
    return hf


# ---------------------------------------------------------------------------------------------------------------
# the two runs (each in its own process)


def run_r1engine(a: argparse.Namespace) -> dict[str, Any]:
    rss_imports = None
    import torch

    from r1engine.trainer import GRPOTrainer, load_config

    torch.set_num_threads(1)
    rss_imports = rss_mib()
    out_dir = Path(a.work_dir) / "r1engine"
    overrides = [
        f"output_dir={out_dir}", "seed=0", f"model.init_from={a.init_dir}", "model.num_mtp_layers=0", "sft.steps=0",
        f"grpo.steps={a.rollouts}", f"grpo.prompts_per_step={a.prompts}", f"grpo.group_size={a.group}",
        f"grpo.mini_batches={a.mini_batches}", f"grpo.lr={a.lr}", f"grpo.beta={a.beta}", "grpo.eps_low=0.2",
        "grpo.eps_high=0.2", "grpo.temperature=1.0", f"grpo.max_new_tokens={a.max_new_tokens}",
        "grpo.mtp_loss_coef=0.0", "grpo.ref_reset_every=0", "grpo.agg=seq-mean-token-mean", "grpo.max_grad_norm=1.0",
        "rewards.weights={arithmetic: 1.0, format: 1.0}", "rewards.num_workers=1",
        f"rollout.backend={a.r1_rollout}", "rollout.num_speculative_tokens=0", "training.chunk_len=256",
        "training.num_threads=1", "checkpoint.every=0", "checkpoint.resume=false", f"eval.every={10**6}",
        "task.num_eval=8", "eval.samples=1", f"grpo.old_logprobs={a.r1_old_logprobs}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    with TreeRSSSampler() as tree:
        trainer = GRPOTrainer(cfg, progress=False)
        trainer.run()
        trainer.close()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step", 0) >= 1]
    # the last step also runs the final evaluation: take its time without it (rollout + train + sync)
    times = [r["time/step_s"] for r in steps[:-1]]
    last = steps[-1]
    times.append(last["time/rollout_s"] + last["time/inference_s"] + last["time/reward_wait_s"] + last["time/train_s"]
                 + last["time/sync_s"])  # fmt: skip
    return {
        "framework": "r1engine",
        "rollout_s": times,
        "reward": [float(r["reward/mean"]) for r in steps],
        "response_len": [float(r["rollout/response_len_mean"]) for r in steps],
        "phases_s": {k: [r[f"time/{k}_s"] for r in steps] for k in ("rollout", "inference", "reward_wait", "train")},
        "rss_after_imports_mib": rss_imports,
        "peak_rss_mib": peak_rss_mib(),
        "peak_tree_rss_mib": tree.peak / 2**20,
    }


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1engine.models import build_char_tokenizer
    from r1engine.rewards import get_reward

    torch.set_num_threads(1)
    rss_imports = rss_mib()
    tokenizer = build_char_tokenizer()
    items = problems(a.rollouts * a.prompts)
    # r1engine prepends BOS to every prompt; the char tokenizer maps the text "<bos>" to that id
    dataset = Dataset.from_dict({"prompt": ["<bos>" + p.prompt for p in items], "answer": [p.answer for p in items]})
    accuracy, fmt = get_reward("arithmetic"), get_reward("format")
    batch_rewards: list[list[float]] = []

    def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        scores = [r.score for r in accuracy(completions, answer)]
        batch_rewards.append(scores)
        return scores

    def format_reward(completions: list[str], **_: Any) -> list[float]:
        scores = [r.score for r in fmt(completions, [None] * len(completions))]
        batch_rewards[-1] = [x + y for x, y in zip(batch_rewards[-1], scores, strict=True)]
        return scores

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    n = a.prompts * a.group
    args = GRPOConfig(
        output_dir=str(Path(a.work_dir) / "trl"), max_steps=a.rollouts * a.mini_batches,
        per_device_train_batch_size=n // a.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=a.mini_batches, num_generations=a.group, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=1.0, beta=a.beta, use_bias_correction_kl=False, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", shuffle_dataset=False, use_cpu=True, bf16=False, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimes()
    with TreeRSSSampler() as tree:
        trainer = GRPOTrainer(
            model=Qwen2ForCausalLM.from_pretrained(Path(a.init_dir) / "qwen2"),
            reward_funcs=[arithmetic_reward, format_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    m = a.mini_batches
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    return {
        "framework": "trl",
        "rollout_s": [sum(timer.times[i : i + m]) for i in range(0, len(timer.times), m)],
        "reward": [sum(b) / len(b) for b in batch_rewards],
        "response_len": lengths,
        "rss_after_imports_mib": rss_imports,
        "peak_rss_mib": peak_rss_mib(),
        "peak_tree_rss_mib": tree.peak / 2**20,
    }


# ---------------------------------------------------------------------------------------------------------------
# orchestration, report


def child(a: argparse.Namespace, framework: str) -> dict[str, Any]:
    out = Path(a.work_dir) / f"{framework}.json"
    cmd = [sys.executable, __file__, "--run", framework, *sys.argv[1:]]
    print(f"running {framework} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    print(f"  {framework}: {time.perf_counter() - t0:.0f} s total", flush=True)
    return result


def run_interleaved(a: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Repeats in ABBA order (r1engine, TRL, TRL, r1engine, ...) so that a drifting load on the shared machine
    weighs on both frameworks alike."""
    runs: dict[str, list[dict[str, Any]]] = {"r1engine": [], "trl": []}
    for i in range(a.repeats):
        for name in ("r1engine", "trl") if i % 2 == 0 else ("trl", "r1engine"):
            runs[name].append(child(a, name))
    return runs


def summarize(runs: list[dict[str, Any]], completions: int) -> dict[str, float]:
    """Samples/s per repeat over rollouts 2.. (the first is the warm-up), then the median over repeats."""
    import statistics

    per_repeat = [completions / statistics.mean(r["rollout_s"][1:]) for r in runs]
    first = runs[0]
    return {
        "samples_per_s": statistics.median(per_repeat),
        "samples_per_s_repeats": per_repeat,
        "rollout_s_median": statistics.median(t for r in runs for t in r["rollout_s"][1:]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "peak_tree_rss_mib": max(r["peak_tree_rss_mib"] for r in runs),
        "rss_after_imports_mib": first["rss_after_imports_mib"],
        "peak_above_imports_mib": max(r["peak_rss_mib"] for r in runs) - first["rss_after_imports_mib"],
    }


def matmul_floor(a: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """A lower bound on one rollout's time: the dense-layer FLOPs that any implementation of this GRPO step must
    spend, at the GEMM throughput this CPU reaches on the model's own layer shapes (measured here, 1 thread).

    Work counted per token of prompt + completion: one forward while generating, one for the reference log-probs
    (beta > 0), and forward + backward (3 forwards) for training; a forward is 2 FLOPs per weight of every linear
    layer (lm_head included). Attention, element-wise ops, sampling and the optimizer are left out."""
    import statistics
    import time

    import torch

    from r1engine.models import PolicyModel

    torch.set_num_threads(1)
    model = PolicyModel.from_pretrained(a.init_dir)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(i * o for i, o in shapes)
    tasks = problems(a.rollouts * a.prompts)
    prompt_tokens = a.group * sum(len(p.prompt) + 1 for p in tasks) / a.rollouts  # BOS + one token per character
    completion_tokens = a.prompts * a.group * statistics.mean(results["r1engine"]["response_len"])
    tokens = prompt_tokens + completion_tokens

    def gemm_flops_per_s(rows: int) -> float:
        pairs = [(torch.randn(rows, i), torch.randn(i, o)) for i, o in shapes]
        for x, w in pairs:  # warm-up
            x @ w
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for x, w in pairs:
                x @ w
            best = min(best, time.perf_counter() - t0)
        return 2 * rows * weights / best

    decode_rate = gemm_flops_per_s(a.prompts * a.group)  # generation: one row per sequence per step
    batch_rate = gemm_flops_per_s(int(tokens) // a.mini_batches)  # reference pass and training: packed tokens
    forward = 2 * weights * tokens
    passes = 3 + (1 if a.beta > 0 else 0)
    return {
        "tokens": tokens,
        "gflop": forward * (1 + passes) / 1e9,
        "decode_gflops": decode_rate / 1e9,
        "batch_gflops": batch_rate / 1e9,
        "floor_s": forward / decode_rate + passes * forward / batch_rate,
    }


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(range(1, len(r["reward"]) + 1), r["reward"], marker="o", label=name)
    ax.set_xlabel("rollout (GRPO step)")
    ax.set_ylabel("mean reward (arithmetic + format, max 2)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt_list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def write_report(
    a: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, float]],
    floor: dict[str, float],
):
    r1, trl = stats["r1engine"], stats["trl"]
    speed = r1["samples_per_s"] / trl["samples_per_s"]
    mem = r1["peak_rss_mib"] / trl["peak_rss_mib"]
    mem_tree = r1["peak_tree_rss_mib"] / trl["peak_tree_rss_mib"]
    mem_above = r1["peak_above_imports_mib"] / trl["peak_above_imports_mib"]
    rows = [
        ("samples/s (completions per wall second)", "samples_per_s", "{:.2f}"),
        ("rollout step, median (s)", "rollout_s_median", "{:.2f}"),
        ("peak RSS, process (MiB)", "peak_rss_mib", "{:.0f}"),
        ("peak RSS, process tree (MiB)", "peak_tree_rss_mib", "{:.0f}"),
        ("RSS after imports (MiB)", "rss_after_imports_mib", "{:.0f}"),
        ("peak RSS above imports (MiB)", "peak_above_imports_mib", "{:.0f}"),
    ]
    table = ["| | r1engine | TRL | r1engine / TRL |", "|---|---|---|---|"]
    for label, key, f in rows:
        table.append(f"| {label} | {f.format(r1[key])} | {f.format(trl[key])} | {r1[key] / trl[key]:.2f} |")
    curves = ["| rollout | " + " | ".join(str(i + 1) for i in range(a.rollouts)) + " |",
              "|---|" + "---|" * a.rollouts]  # fmt: skip
    for name, r in results.items():
        curves.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in r["reward"]) + " |")
    phases = results["r1engine"].get("phases_s", {})
    phase_line = ", ".join(f"{k} {sorted(v[1:])[len(v[1:]) // 2]:.2f} s" for k, v in phases.items())
    settings = common_settings(a)
    old_source = {
        "sampler": "the rollout engine's (`grpo.old_logprobs=sampler`: no inference pass for them)",
        "recompute": "recomputed by the trainer",
    }[a.r1_old_logprobs]
    text = f"""# r1engine vs TRL GRPOTrainer (CPU)

`benchmarks/bench_vs_trl.py`, {datetime.date.today()}, commit {git_commit()}, {cpu_name()}, {os.cpu_count()} cores
(shared with other engineers: absolute times vary; {a.repeats} runs per framework interleaved ABBA), torch
{results["r1engine"].get("torch", "")}, TRL {results["trl"].get("trl", "")}.
Command: `{" ".join(["python", "benchmarks/bench_vs_trl.py", *sys.argv[1:]])}`

Setting (identical for both): {", ".join(f"{k} {v}" for k, v in settings.items())}. Model: `PolicyConfig.demo`
body without MTP (hidden 192, 3 layers, 6/2 heads, MLP 512, vocab 101; {results["r1engine"].get("params", "?")}
parameters), starting from the same {a.sft_steps}-step cold-start SFT checkpoint. r1engine: rollout backend
`{a.r1_rollout}` (no speculation), rewards in 1 worker process, packing into 256-token chunks (the forward skips
their padding), fused C++ loss, old log-probs: {old_source}; TRL recomputes them.
TRL: Hugging Face `generate` (TRL's vLLM path needs CUDA), padded batches, rewards in-process. Timed: rollouts
2..{a.rollouts} (the first is the warm-up); each rollout = {a.prompts * a.group} completions and {a.mini_batches}
optimizer steps. samples/s: median over the repeats (r1engine {fmt_list(r1["samples_per_s_repeats"])}, TRL
{fmt_list(trl["samples_per_s_repeats"])}); peak RSS: the largest over the repeats.

{chr(10).join(table)}

**r1engine is {speed:.2f}x TRL's samples/s with {mem:.2f}x its peak process RSS** ({mem_tree:.2f}x for the process
trees; {mem_above:.2f}x counting only what each adds above its own imports). Goal: >= 2x faster,
<= 0.5x memory.

r1engine per rollout (median): {phase_line}.

**Matmul floor** (`matmul_floor`: the dense-layer FLOPs every implementation of this step spends, at the GEMM
throughput measured on the model's layer shapes in this run): {floor["tokens"]:.0f} tokens per rollout,
{floor["gflop"]:.1f} GFLOP (generation 1 + reference 1 + training 3 forwards) at {floor["decode_gflops"]:.0f} GFLOP/s
(generation, {a.prompts * a.group} rows) and {floor["batch_gflops"]:.0f} GFLOP/s (packed batches) =
**{floor["floor_s"]:.2f} s**.
r1engine's step is {r1["rollout_s_median"] / floor["floor_s"]:.2f}x the floor, TRL's
{trl["rollout_s_median"] / floor["floor_s"]:.2f}x; no implementation of this setting can be more than
{trl["rollout_s_median"] / floor["floor_s"]:.2f}x TRL's speed on this CPU.

Mean reward per rollout (the same prompts in the same order for both):

{chr(10).join(curves)}

![reward curves](vs_trl.png)
"""
    (RESULTS / "vs_trl.md").write_text(text)
    plot(results, RESULTS / "vs_trl.png", f"GRPO on addition, {a.prompts}x{a.group} per rollout, same start")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.001)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework, interleaved ABBA")
    parser.add_argument("--r1-rollout", default="native", choices=["native", "vllm"])
    parser.add_argument(
        "--r1-old-logprobs", default="sampler", choices=["sampler", "recompute"],
        help="r1engine's old log-probs: the rollout engine's (no inference pass) or recomputed by the trainer",
    )  # fmt: skip
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_vs_trl"))
    parser.add_argument("--run", choices=["prepare", "r1engine", "trl"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.init_dir = str(ROOT / "runs" / "bench_vs_trl" / f"init-sft{a.sft_steps}")  # shared by runs, made once
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)

    if a.run == "prepare":
        prepare(a)
        return
    if a.run is not None:
        import torch

        result = run_r1engine(a) if a.run == "r1engine" else run_trl(a)
        import trl

        result.update(torch=torch.__version__, trl=trl.__version__)
        if a.run == "r1engine":
            from r1engine.models import PolicyModel

            result["params"] = PolicyModel.from_pretrained(a.init_dir).num_parameters()
        (Path(a.work_dir) / f"{a.run}.json").write_text(json.dumps(result))
        return

    if not (Path(a.init_dir) / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--run", "prepare", *sys.argv[1:]], check=True, cwd=ROOT)
    runs = run_interleaved(a)
    n = a.prompts * a.group
    stats = {name: summarize(r, n) for name, r in runs.items()}
    results = {name: r[0] for name, r in runs.items()}  # reward curves and details: the first repeat
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(a, results, stats, matmul_floor(a, results))


if __name__ == "__main__":
    main()
