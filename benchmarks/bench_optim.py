"""Benchmark of r1engine.optim.FusedAdamW against torch.optim.AdamW on the CPU: step time and resident memory.

Step time, at 1M / 10M / 100M fp32 parameters (split into tensors of a transformer-like mix of sizes, odd ones
included), one thread, all optimizers measured in the same run, interleaved (one step of each per repeat; the
median over repeats is reported):

  ours          FusedAdamW (cpp backend: one fused AVX2 pass per tensor)
  ours+clip     FusedAdamW.grad_norm() + step(grad_scale=...)  (gradient clipping folded into the step)
  torch         torch.optim.AdamW defaults (on CPU: the per-tensor for-loop implementation)
  torch-foreach torch.optim.AdamW(foreach=True)
  torch-fused   torch.optim.AdamW(fused=True)
  torch+clip    torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW(fused=True)

Memory floor: an fp32 AdamW step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq,
28 bytes per parameter; the table gives the bandwidth each step reaches against that floor.

Resident memory: fresh processes that import torch and r1engine, build a small model, and construct + step
either FusedAdamW or torch.optim.AdamW (which imports torch._dynamo); peak RSS (VmHWM) of each, median over
interleaved repeats.

    OMP_NUM_THREADS=1 python benchmarks/bench_optim.py               # ~3 min on an idle core, ~5 GB at 100M
    python benchmarks/bench_optim.py --sizes 1e6 1e7 --repeats 5     # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / the extension start their OpenMP runtime

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import cpu_name  # noqa: E402
from r1engine import _ext  # noqa: E402
from r1engine.optim import FusedAdamW, clip_coefficient  # noqa: E402

BYTES_PER_PARAM = 28  # fp32: read p, g, m, v; write p, m, v
MAX_NORM = 1.0


def shapes_for(total: int) -> list[tuple[int, ...]]:
    """Blocks of a transformer-like layer (square and 4x MLP matrices, a norm vector, an odd-sized bias) scaled
    so that the total is ~`total` parameters."""
    h = max(8, int((total / 12.5) ** 0.5))  # ~12 h^2 per block
    block = [(h, h), (h, h), (4 * h, h), (h, 4 * h), (h,), (4 * h + 3,), (h, h)]
    per = sum(int(torch.tensor(s).prod()) for s in block)
    shapes = []
    while sum(int(torch.tensor(s).prod()) for s in shapes) + per <= total:
        shapes.extend(block)
    rest = total - sum(int(torch.tensor(s).prod()) for s in shapes)
    if rest > 0:
        shapes.append((rest,))
    return shapes


def make_steppers(params: list[torch.Tensor]) -> dict:
    """name -> callable doing one optimizer step (with clipping where the name says so); each has its own state."""

    def ours_clip(opt):
        opt.step(grad_scale=clip_coefficient(opt.grad_norm(), MAX_NORM))

    def torch_clip(opt):
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    kw = {"lr": 1e-4, "weight_decay": 0.01}
    entries = {
        "ours": (FusedAdamW(params, backend="cpp", **kw), lambda o: o.step()),
        "ours+clip": (FusedAdamW(params, backend="cpp", **kw), ours_clip),
        "torch": (torch.optim.AdamW(params, **kw), lambda o: o.step()),
        "torch-foreach": (torch.optim.AdamW(params, foreach=True, **kw), lambda o: o.step()),
        "torch-fused": (torch.optim.AdamW(params, fused=True, **kw), lambda o: o.step()),
        "torch+clip": (torch.optim.AdamW(params, fused=True, **kw), torch_clip),
    }
    return {name: (lambda o=o, f=f: f(o)) for name, (o, f) in entries.items()}


def bench_size(total: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes_for(total)]
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    steppers = make_steppers(params)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(repeats + 1):  # repeat 0 allocates the state and warms up: not timed
        for name, step in steppers.items():
            for p, gr in zip(params, grads, strict=True):
                p.grad = gr.clone() if "clip" in name else gr  # clipping scales grads in place
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r > 0:
                times[name].append(dt)
    for p in params:
        p.grad = None
    return {name: statistics.median(ts) for name, ts in times.items()}


RSS_CHILD = """
import sys, torch
import r1engine.optim
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
opt = r1engine.optim.FusedAdamW(model.parameters()) if sys.argv[1] == "ours" else torch.optim.AdamW(model.parameters())
model(torch.randn(4, 64)).square().mean().backward()
opt.step()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) / 1024, "torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""


def bench_rss(repeats: int) -> dict[str, tuple[float, bool, bool]]:
    out: dict[str, list[tuple[float, bool, bool]]] = {"ours": [], "torch": []}
    for _ in range(repeats):
        for name in out:
            res = subprocess.run([sys.executable, "-c", RSS_CHILD, name], capture_output=True, text=True, check=True)
            mib, dynamo, sympy = res.stdout.split()
            out[name].append((float(mib), dynamo == "True", sympy == "True"))
    return {name: (statistics.median(r[0] for r in rows), rows[0][1], rows[0][2]) for name, rows in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer (100M: at most 3)")
    ap.add_argument("--rss-repeats", type=int, default=3)
    args = ap.parse_args()
    _ext.require("adamw_step_")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(
        f"# {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, extension {_ext.build_info()}"
    )

    print(
        "\n| params | "
        + " | ".join(["ours", "ours+clip", "torch", "torch-foreach", "torch-fused", "torch+clip"])
        + " | torch/ours | foreach/ours | fused/ours | torch+clip / ours+clip | ours GB/s |"
    )
    print("|---" * 12 + "|")
    for size in args.sizes:
        total = int(size)
        repeats = min(args.repeats, 3) if total >= 5e7 else args.repeats
        t = bench_size(total, repeats)
        cells = " | ".join(f"{t[k] * 1e3:.1f} ms" for k in t)
        bw = BYTES_PER_PARAM * total / t["ours"] / 1e9
        print(
            f"| {total / 1e6:.0f}M | {cells} | {t['torch'] / t['ours']:.2f}x | {t['torch-foreach'] / t['ours']:.2f}x"
            f" | {t['torch-fused'] / t['ours']:.2f}x | {t['torch+clip'] / t['ours+clip']:.2f}x | {bw:.1f} |",
            flush=True,
        )

    rss = bench_rss(args.rss_repeats)
    print("\n| process (import torch + r1engine, small model, one step) | peak RSS | torch._dynamo | sympy |")
    print("|---|---|---|---|")
    for name, label in (("ours", "FusedAdamW"), ("torch", "torch.optim.AdamW")):
        mib, dynamo, sympy = rss[name]
        print(f"| {label} | {mib:.0f} MiB | {'imported' if dynamo else 'no'} | {'imported' if sympy else 'no'} |")
    print(f"| difference | {rss['torch'][0] - rss['ours'][0]:.0f} MiB | | |")


if __name__ == "__main__":
    main()
