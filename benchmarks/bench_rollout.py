"""Rollout throughput with and without MTP self-speculation (native and vLLM backends), and MTP acceptance over a
short policy-shifting run with and without the MTP loss keeping the draft head in step.

Model: `PolicyConfig.demo()` (1.7M params, hidden 192, 3 layers + 1 MTP layer) first fitted on the toy pattern task
(`r1engine.models.toy`, arithmetic progressions with steps {1,2,3}) so that its MTP head has something to predict.

Part 1 (tokens/s): the same prompts (batch shapes `--shapes`, prompts x samples; `--new-tokens` each; T=1) generated
by each backend without speculation (the baseline) and with `k` = 1, 2 speculative tokens; ratio = spec / plain
tokens/s, measured back to back in one run. Each vLLM configuration runs in its own subprocess (one `vllm.LLM`
per process), after one warm-up call.

Part 2 (acceptance under policy drift): the policy is moved by `--rl-steps` optimizer steps on a *shifted* task
(steps {4,5}), a stand-in for RL updates (it moves the distribution the way RL would, deterministically and
cheaply; no reward model involved). Arm "with MTP loss": each step adds `mtp_loss(lam=0.3, detach_main=True)`
(trains only the MTP layers to follow the policy). Arm "without": the draft head stays as it was. After every step
the weights are synced into the engine (`sync_weights`, no disk) and the acceptance rate is measured on prompts of
the shifted task.

Usage: `python benchmarks/bench_rollout.py` (about 6-10 min on 2 busy cores); `--backends native` to skip vLLM;
on a GPU machine (no vLLM there): `python benchmarks/bench_rollout.py --backends native --device cuda`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1engine.models import PolicyConfig, PolicyModel, build_char_tokenizer
from r1engine.models.toy import fit_pattern, pattern_batch
from r1engine.rollout import create_engine, vllm_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

SHIFTED = (4, 5)


def base_model(steps: int, num_layers: int, hidden: int, seed: int = 0) -> PolicyModel:
    torch.manual_seed(seed)
    heads = hidden // 32
    cfg = PolicyConfig.demo(max_position_embeddings=512, num_layers=num_layers, hidden_size=hidden, num_heads=heads)
    m = PolicyModel(cfg)
    fit_pattern(m, steps, batch=16, length=24, lr=3e-3, seed=seed)
    return m


def throughput(engine, prompts, n, new_tokens, seed=0, **kw) -> dict:
    engine.generate(prompts[:2], n=1, max_new_tokens=8, seed=seed)  # warm-up
    b = engine.generate(prompts, n=n, max_new_tokens=new_tokens, seed=seed, **kw)
    return b.stats.as_dict()


def drift_run(engine, model: PolicyModel, steps: int, use_mtp_loss: bool, prompts, n, new_tokens) -> list[float]:
    """Shift `model` (a copy) for `steps` optimizer steps; after each, sync and measure acceptance."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(123)
    acc = []
    engine.sync_weights(m)
    acc.append(engine.generate(prompts, n=n, max_new_tokens=new_tokens, seed=0).stats.acceptance_rate)
    for _ in range(steps):  # the policy trains on CPU; only the engine sits on --device
        ids = pattern_batch(16, 24, gen, SHIFTED)
        out = m(ids)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, m.config.vocab_size), ids[:, 1:].reshape(-1))
        if use_mtp_loss:
            loss = loss + m.mtp_loss(ids, out.last_hidden, lam=0.3, detach_main=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        engine.sync_weights(m)
        acc.append(engine.generate(prompts, n=n, max_new_tokens=new_tokens, seed=0).stats.acceptance_rate)
    return acc


def run_backend(backend: str, model_dir: str, args, ks: list[int], part: str) -> dict:
    model = PolicyModel.from_pretrained(model_dir)
    out: dict = {}
    if part in ("tput", "all"):
        for k in ks:
            kw = dict(max_model_len=256)
            if backend == "vllm":
                kw.update(max_num_seqs=256)
            else:
                kw.update(device=args.device)
            eng = create_engine(backend, model_dir=model_dir, num_speculative_tokens=k, **kw)
            for shape in args.shapes:
                n_prompts, n = (int(x) for x in shape.split("x"))
                prompts = pattern_batch(n_prompts, 3, torch.Generator().manual_seed(7)).tolist()
                out[f"k{k}_{shape}"] = throughput(eng, prompts, n, args.new_tokens)
            del eng
    if part in ("drift", "all"):
        kw = {"device": args.device} if backend == "native" else {}
        eng = create_engine(backend, model_dir=model_dir, num_speculative_tokens=1, max_model_len=256, **kw)
        shifted = pattern_batch(args.prompts, 3, torch.Generator().manual_seed(8), SHIFTED).tolist()
        for arm in (True, False):
            out[f"drift_mtp_loss_{arm}"] = drift_run(eng, model, args.rl_steps, arm, shifted, 2, args.new_tokens)
        t0 = time.perf_counter()
        eng.sync_weights(model)
        out["sync_s"] = time.perf_counter() - t0
    return out


def child(args) -> None:
    torch.set_num_threads(1)
    res = run_backend(args.child_backend, args.model_dir, args, [args.child_k], args.child_part)
    print("RESULT " + json.dumps(res))


def spawn(args, backend: str, k: int, part: str) -> dict:
    cmd = [sys.executable, __file__, "--child-backend", backend, "--child-k", str(k), "--child-part", part]
    cmd += ["--model-dir", args.model_dir, "--prompts", str(args.prompts), "--shapes", *args.shapes]
    cmd += ["--new-tokens", str(args.new_tokens), "--rl-steps", str(args.rl_steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{backend} k={k} {part} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["native", "vllm"])
    ap.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shapes", nargs="+", default=["1x1", "4x1", "16x4"], help="prompts x samples per prompt")
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the drift part (2 samples each)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fit-steps", type=int, default=200)
    ap.add_argument("--num-layers", type=int, default=3, help="main-model layers (1 MTP layer on top)")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--rl-steps", type=int, default=6)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default="cpu", help="native engine device (cuda on a GPU machine)")
    ap.add_argument("--child-backend", default=None)
    ap.add_argument("--child-k", type=int, default=0)
    ap.add_argument("--child-part", default="all")
    args = ap.parse_args()
    if args.child_backend:
        child(args)
        return
    torch.set_num_threads(1)
    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="bench-rollout-")
        t0 = time.perf_counter()
        base_model(args.fit_steps, args.num_layers, args.hidden).save_pretrained(args.model_dir, build_char_tokenizer())
        print(
            f"fitted model ({args.num_layers} layers + 1 MTP, hidden {args.hidden}) on the toy task: "
            f"{args.fit_steps} steps in {time.perf_counter() - t0:.0f}s"
        )
    print(f"# bench_rollout  {datetime.date.today()}  commit {git_commit()}  {cpu_name()}")
    print(f"# batch shapes (prompts x n) {args.shapes}, {args.new_tokens} new tokens, T=1.0, 1 torch thread")
    results: dict = {}
    for backend in args.backends:
        if backend == "vllm" and not vllm_available():
            print("vllm not installed: skipped")
            continue
        r: dict = {}
        if backend == "native":
            r = run_backend("native", args.model_dir, args, args.ks, "all")
        else:
            for k in args.ks:
                r.update(spawn(args, "vllm", k, "tput"))
            r.update(spawn(args, "vllm", 1, "drift"))
        results[backend] = r
        print(f"\n## {backend}: tokens/s, ratio vs no speculation (k=0, same batch), acceptance")
        print("| batch (prompts x n) | k | tokens/s | ratio | acceptance | drafted | accepted |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes:
            base = r[f"k0_{shape}"]["tokens_per_s"] if 0 in args.ks else float("nan")
            for k in args.ks:
                s = r[f"k{k}_{shape}"]
                print(
                    f"| {shape} | {k} | {s['tokens_per_s']:.0f} | {s['tokens_per_s'] / base:.2f}x "
                    f"| {s['acceptance_rate']:.3f} | {s['num_drafted']} | {s['num_accepted']} |"
                )
        print(f"\n## {backend}: acceptance (k=1) after each policy-shifting step, synced live")
        print("| arm | " + " | ".join(f"step {i}" for i in range(args.rl_steps + 1)) + " |")
        print("|---|" + "---|" * (args.rl_steps + 1))
        for arm in (True, False):
            vals = r[f"drift_mtp_loss_{arm}"]
            name = "with MTP loss" if arm else "without (stale head)"
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        print(f"sync_weights of the whole model (main + MTP): {r['sync_s'] * 1e3:.1f} ms")
    print("\nRESULTS_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
