"""The loss part of a trainer step, three ways: which `training.loss_path` the GRPO trainer should take.

What is measured: from the final hidden states of the loss tokens `hidden [N, H]` and a real-shaped lm_head weight
`[V, H]` to the loss, its metrics and both gradients (hidden's and the head's), i.e. what
`r1engine.trainer.grpo.clipped_policy_loss` does between the body's forward and the MTP loss, with the trainer's
loss settings (`GRPOConfig().loss_params()`: k3 KL to a reference with beta 0.001, eps 0.2, seq-mean-token-mean,
the token entropy tracked as a metric). Arms:

* `(a) logits + new grad + entropy pass` (baseline, the path issue 18 item 6 describes): the lm_head writes the
  logits, `grpo_loss(..., inplace_backward=False)` (its backward allocates a new `[N, V]` gradient), and the entropy
  metric is a second pass over the logits (`mean_entropy`, the function the trainer had in
  `r1engine/trainer/sequences.py` at d7e97ce, re-implemented below);
* `(b) logits, in-place backward` (`training.loss_path: logits`): the trainer's `head_policy_loss` on that path:
  `grpo_loss(..., inplace_backward=True)`, the entropy from the loss's own vocabulary pass;
* `(c) lm_head fused` (`training.loss_path: lm_head_fused`): `head_policy_loss` on that path, i.e.
  `linear_grpo_loss(hidden, lm_head.weight, ...)` (backend "auto": "torch", chunked logits in fp32, on CPU;
  "triton" on CUDA); logits never held whole.

Inputs, the same for every arm (regenerated from the seed in each process): `hidden` ~ N(0, 1) (final-normed
states), weight ~ N(0, 0.02^2) (Qwen2's init), random targets, the N tokens split into sequences of 0.5-1.5x
`--tokens-per-seq` with one N(0, 1) advantage each; old and reference log-probs are the true log-probs of the
targets plus N(0, 0.05^2) and N(0, 0.1^2) noise (ratios near 1 as in a GRPO mini-batch: few clipped tokens, which
the fused path would skip).

Time: median over `--repeats` steps after one warm-up step on the first `--warmup-tokens` tokens (on CUDA each step
ends with a synchronize). Memory: each arm runs in a fresh process (`--in-process`: in this one, for tests);
peak above what was allocated before the step (hidden, weight, the inputs), the gradients of hidden and the head
included (both are freed before every step, as the optimizer's zero_grad does): CUDA
`torch.cuda.max_memory_allocated()`; CPU the growth of peak RSS (VmHWM, reset via /proc/self/clear_refs), with
glibc's mmap threshold at 1 MiB so that freed tensors leave RSS (`benchmarks/common.py`). Ratios are against (a)
measured in the same run.

Usage:

    python benchmarks/bench_loss_path.py --threads 1 --out /tmp/loss_path.md     # CPU, both shapes (minutes)
    python benchmarks/bench_loss_path.py --device cuda --tokens 4096,16384 --out $OUT/loss_path_gpu.md

`main(argv)` returns the result as a dict (the test calls it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit, peak_memory, precise_cpu_rss, write_report  # noqa: E402
from r1engine.algo.policy_loss import LossParams  # noqa: E402
from r1engine.models.policy import LMHead  # noqa: E402
from r1engine.ops import grpo_loss  # noqa: E402
from r1engine.trainer.config import GRPOConfig  # noqa: E402
from r1engine.trainer.loss_path import head_policy_loss  # noqa: E402

ARMS = ("logits+grad+entropy_pass", "logits_inplace", "lm_head_fused")
BASELINE = ARMS[0]
LABELS = {
    "logits+grad+entropy_pass": "(a) logits + new [N, V] grad + entropy pass (before)",
    "logits_inplace": "(b) logits, in-place backward, fused entropy (`logits`)",
    "lm_head_fused": "(c) lm_head fused, linear_grpo_loss (`lm_head_fused`)",
}
# lm_head shapes [V, H] from the models' config.json (hidden_size, vocab_size)
SHAPES = {"smollm2-135m": (576, 49152), "qwen2.5-0.5b": (896, 151936)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# inputs


def parse_shape(name: str) -> tuple[str, int, int]:
    """A preset name or `HxV` -> (name, H, V)."""
    if name in SHAPES:
        return (name, *SHAPES[name])
    try:
        h, v = (int(x) for x in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes: expected one of {', '.join(SHAPES)} or HxV, got {name!r}") from None
    if h < 1 or v < 2:
        raise ValueError(f"--shapes: expected H >= 1 and V >= 2, got {name!r}")
    return name, h, v


def dense_inputs(h: int, v: int, n: int, seed: int, dtype: torch.dtype, device: str):
    """hidden [N, H] and weight [V, H], the same in every process for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(v, h, generator=gen) * 0.02).to(device=device, dtype=dtype)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    return hidden, weight


def token_inputs(n: int, v: int, tokens_per_seq: int, seed: int) -> dict[str, torch.Tensor]:
    """targets, segment ids and per-sequence advantages (CPU)."""
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(v, (n,), generator=gen)
    lengths = []
    while sum(lengths) < n:
        lo, hi = max(1, tokens_per_seq // 2), max(1, (3 * tokens_per_seq) // 2)
        lengths.append(min(int(torch.randint(lo, hi + 1, (1,), generator=gen)), n - sum(lengths)))
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    advantages = torch.randn(len(lengths), generator=gen)
    return {"targets": targets, "segment_ids": segment_ids, "advantages": advantages}


@torch.no_grad()
def true_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int = 512) -> torch.Tensor:
    out = []
    w = weight.float()
    for i in range(0, hidden.shape[0], rows):
        logp = torch.log_softmax(hidden[i : i + rows].float() @ w.T, -1)
        out.append(logp.gather(1, targets[i : i + rows, None].to(logp.device)).squeeze(1).cpu())
    return torch.cat(out)


def prepare(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The per-token inputs of one (shape, N): targets, segments, advantages, old and reference log-probs."""
    hidden, weight = dense_inputs(spec["h"], spec["v"], spec["n"], spec["seed"], DTYPES[spec["dtype"]], spec["device"])
    x = token_inputs(spec["n"], spec["v"], spec["tokens_per_seq"], spec["seed"])
    logp = true_logprobs(hidden, weight, x["targets"])
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    x["old"] = logp + 0.05 * torch.randn(logp.shape, generator=gen)
    x["ref"] = logp + 0.1 * torch.randn(logp.shape, generator=gen)
    return x


# ---------------------------------------------------------------------------------------------------------------
# the arms


@torch.no_grad()
def mean_entropy(logits: torch.Tensor, temperature: float, rows_per_chunk: int = 1024) -> float:
    """The trainer's former entropy metric (r1engine/trainer/sequences.py at d7e97ce): a second pass over the
    logits, in row chunks."""
    total = 0.0
    for chunk in logits.split(rows_per_chunk):
        logp = torch.log_softmax(chunk.float() / temperature, -1)
        total += float(-(logp.exp() * logp).sum())
    return total / max(1, logits.shape[0])


def loss_step(arm: str, head: LMHead, hidden: torch.Tensor, x: dict[str, torch.Tensor], params: LossParams):
    """One loss forward + backward; returns (loss, mean entropy) as floats."""
    args = (x["targets"], x["advantages"], x["old"], x["ref"])
    if arm == "logits+grad+entropy_pass":
        logits = head(hidden)
        loss, m = grpo_loss(
            logits, x["targets"], x["advantages"], torch.ones(len(x["targets"]), device=hidden.device), x["old"],
            x["ref"], params=LossParams.build(params, track_entropy=False), segment_ids=x["segment_ids"],
        )  # fmt: skip
        entropy = mean_entropy(logits, params.temperature)
    else:
        path = "logits" if arm == "logits_inplace" else "lm_head_fused"
        loss, m = head_policy_loss(head, hidden, *args, params=params, segment_ids=x["segment_ids"], loss_path=path)
        entropy = float(m.entropy_mean)
    loss.backward()
    return float(loss.detach()), entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(spec: dict[str, Any], arm: str, token_file: str) -> dict[str, Any]:
    """Measure one arm on one (shape, N) in this process (with `spec["threads"]` torch threads, restored after)."""
    threads = torch.get_num_threads()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        return _measure(spec, arm, token_file)
    finally:
        torch.set_num_threads(threads)


def _measure(spec: dict[str, Any], arm: str, token_file: str) -> dict[str, Any]:
    device = torch.device(spec["device"])
    hidden, weight = dense_inputs(spec["h"], spec["v"], spec["n"], spec["seed"], DTYPES[spec["dtype"]], spec["device"])
    x = {k: t.to(device) for k, t in torch.load(token_file).items()}
    head = LMHead(spec["h"], spec["v"])
    head.weight = torch.nn.Parameter(weight)
    hidden.requires_grad_(True)
    params = GRPOConfig().loss_params(with_kl=True)

    def step(rows: int | None):
        head.weight.grad, hidden.grad = None, None
        if rows is None:
            return loss_step(arm, head, hidden, x, params)
        part = {k: (t if k == "advantages" else t[:rows]) for k, t in x.items()}
        return loss_step(arm, head, hidden[:rows], part, params)

    step(min(spec["warmup_tokens"], spec["n"]))
    times, peaks, totals = [], [], []
    for _ in range(spec["repeats"]):
        head.weight.grad, hidden.grad = None, None
        gc.collect()
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            loss, entropy = step(None)
            _sync(device)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.extra)
        totals.append(mem.total)
    return {
        "arm": arm,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_extra_bytes": max(peaks) if None not in peaks else None,
        "peak_total_bytes": max(totals) if None not in totals else None,
        "loss": loss,
        "entropy": entropy,
        "grad_hidden_norm": float(hidden.grad.float().norm()),
        "grad_weight_norm": float(head.weight.grad.float().norm()),
    }


def _worker(argv: list[str]) -> None:
    spec, arm, token_file = json.loads(argv[0]), argv[1], argv[2]
    if spec["device"] == "cpu":
        precise_cpu_rss()
    print(json.dumps(run_arm(spec, arm, token_file)))


def run_arm_process(spec: dict[str, Any], arm: str, token_file: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), arm, token_file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{arm} at {spec['shape']} N={spec['n']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loss_path_") as tmp:
        for shape in args.shapes:
            name, h, v = parse_shape(shape)
            for n in args.tokens:
                spec = dict(shape=name, h=h, v=v, n=n, seed=args.seed, dtype=args.dtype, device=args.device,
                            tokens_per_seq=args.tokens_per_seq, warmup_tokens=args.warmup_tokens,
                            repeats=args.repeats, threads=args.threads)  # fmt: skip
                token_file = str(Path(tmp) / f"{name}-{n}.pt")
                torch.save(prepare(spec), token_file)
                arms = {}
                for arm in args.arms:
                    measure = run_arm if args.in_process else run_arm_process
                    a = arms[arm] = measure(spec, arm, token_file)
                    print(f"{name} N={n} {arm}: {a['median_s']:.3f} s, peak +{_mib(a['peak_extra_bytes'])}", flush=True)
                rows.append(_compare(spec, arms))
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": args.threads or torch.get_num_threads(),
        "dtype": args.dtype,
        "command": args.command,
        "in_process": args.in_process,
        "repeats": args.repeats,
        "rows": rows,
    }


def _compare(spec: dict[str, Any], arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = arms.get(BASELINE)
    for a in arms.values():
        a["speed_vs_baseline"] = base["median_s"] / a["median_s"] if base else None
        ok = base and base["peak_extra_bytes"] and a["peak_extra_bytes"] is not None
        a["memory_vs_baseline"] = a["peak_extra_bytes"] / base["peak_extra_bytes"] if ok else None
    ref = base or next(iter(arms.values()))
    diff = 0.0
    for a in arms.values():
        for key in ("loss", "entropy", "grad_hidden_norm", "grad_weight_norm"):
            diff = max(diff, abs(a[key] - ref[key]) / max(1.0, abs(ref[key])))
    itemsize = torch.empty(0, dtype=DTYPES[spec["dtype"]]).element_size()
    return {**spec, "logits_bytes": spec["n"] * spec["v"] * itemsize, "arms": arms, "max_check_diff": diff}


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"## {result['device']}, {result['dtype']}, {result['threads']} torch thread(s)",
        "",
        f"Date {result['date']}, commit `{result['commit']}`, torch {result['torch']}; median of {result['repeats']} "
        f"steps after a warm-up; {'in this process' if result['in_process'] else 'one fresh process per arm'}.",
        f"Command: `{result['command']}`",
        "",
        "| lm_head [V, H] | N | logits | path | median s | speed vs (a) | peak extra | memory vs (a) | loss "
        "| entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for arm, a in row["arms"].items():
            lines.append(
                f"| {row['shape']} [{row['v']:,}, {row['h']}] | {row['n']:,} | {_mib(row['logits_bytes'])} | "
                f"{LABELS[arm]} | {a['median_s']:.3f} | {_ratio(a['speed_vs_baseline'])} | "
                f"{_mib(a['peak_extra_bytes'])} | {_ratio(a['memory_vs_baseline'])} | {a['loss']:.6f} | "
                f"{a['entropy']:.4f} |"
            )
    worst = max((row["max_check_diff"] for row in result["rows"]), default=0.0)
    lines += [
        "",
        "`speed vs (a)`: (a)'s median time / the path's (above 1: faster); `memory vs (a)`: the path's peak extra "
        "memory / (a)'s (below 1: less). `logits`: the size of the [N, V] logits in this dtype.",
        f"Same inputs: loss, entropy and the gradient norms of hidden and weight agree across the paths to "
        f"{worst:.1e} (largest difference relative to max(1, |value|)).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b", help=f"comma-separated: {', '.join(SHAPES)} or HxV")
    p.add_argument("--tokens", default="1024,4096", help="comma-separated numbers of loss tokens N")
    p.add_argument("--tokens-per-seq", type=int, default=256, help="mean loss tokens per sequence")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the trainer's model.dtype default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-tokens", type=int, default=256, help="the warm-up step's tokens")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="run the arms in this process (memory: approximate)")
    p.add_argument("--out", type=Path, help="write the results as markdown here")
    p.add_argument("--json", type=Path, help="write the raw result as JSON here")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    for s in args.shapes:
        parse_shape(s)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        raise ValueError(f"--tokens: expected comma-separated integers, got {args.tokens!r}") from None
    if not args.tokens or min(args.tokens) < 1:
        raise ValueError(f"--tokens: expected numbers >= 1, got {args.tokens}")
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.arms or set(args.arms) - set(ARMS):
        raise ValueError(f"--arms: expected a subset of {', '.join(ARMS)}, got {args.arms}")
    for flag in ("repeats", "tokens_per_seq", "warmup_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    args.command = "python benchmarks/bench_loss_path.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (arguments as on the command line), print and optionally write the results."""
    args = parse_args(argv)
    result = run(args)
    write_report(markdown(result), result, args.out, args.json)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        main()
    sys.exit(0)
