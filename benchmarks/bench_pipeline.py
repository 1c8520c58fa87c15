"""Pipeline schedules: simulated bubbles against the published formulas, and a CPU wall-clock run.

Part 1 (simulation, compiled core): bubble fraction sum_r(makespan - busy_r) / (ranks * makespan) and the largest
per-rank bubble for DualPipe (PP ranks), DualPipeV (PP/2 ranks), 1F1B and ZB1P (PP ranks), PP = 4, 8, 16 stages,
micro-batches M = 2PP .. 8PP, against the DualPipe README formulas; plot to benchmarks/results/pipeline_bubble.png.
Part 2 (wall clock): 4 gloo processes on CPU run one 8-block MLP model with DualPipeV (8 stages of 1 block) and with
1F1B / ZB1P / DualPipe (4 stages of 2 blocks); the baseline is 1F1B, ratios are step-time(1F1B) / step-time(X).

    python benchmarks/bench_pipeline.py [--quick] [--no-wallclock] [--out benchmarks/results/pipeline.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

from r1engine.pipeline import Costs, build_schedule, published_bubble, simulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _schedule(kind: str, pp: int, m: int):
    ranks = pp // 2 if kind == "dualpipev" else pp
    return build_schedule(kind, ranks, m)


def simulate_table(costs: Costs, pps: tuple[int, ...], mults: tuple[int, ...]) -> tuple[list[str], dict]:
    """Markdown rows and {(kind, pp): [(m, fraction)]} for the plot."""
    rows = [
        "| PP | M | "
        + " | ".join(f"{k} frac" for k in KINDS)
        + " | "
        + " | ".join(f"{k} max/formula" for k in KINDS)
        + " |",
        "|---" * (2 + 2 * len(KINDS)) + "|",
    ]
    curves: dict = {}
    for pp in pps:
        for mult in mults:
            m = mult * pp
            fr, chk = [], []
            for kind in KINDS:
                res = simulate(_schedule(kind, pp, m), costs)
                form = published_bubble(kind, pp, costs)
                fr.append(f"{res.bubble_fraction:.4f}")
                chk.append(f"{res.max_bubble:.2f}/{form:.2f}")
                curves.setdefault((kind, pp), []).append((m, res.bubble_fraction))
            rows.append(f"| {pp} | {m} | " + " | ".join(fr) + " | " + " | ".join(chk) + " |")
    return rows, curves


def plot(curves: dict, pps: tuple[int, ...], costs: Costs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pps), figsize=(5 * len(pps), 4), sharey=True)
    for ax, pp in zip(axes, pps, strict=True):
        for kind in KINDS:
            pts = curves[(kind, pp)]
            ax.plot([m / pp for m, _ in pts], [f for _, f in pts], marker="o", label=kind)
        ax.set_title(f"PP = {pp} stages")
        ax.set_xlabel("micro-batches / PP")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bubble fraction (idle / total device time)")
    axes[0].legend()
    fig.suptitle(f"Simulated pipeline bubble, F={costs.f} B={costs.b} W={costs.w} F&B={costs.overlapped}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- wall clock
def _block(hidden: int):
    from torch import nn

    from r1engine.pipeline import DeferrableLinear

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = DeferrableLinear(hidden, 4 * hidden)
            self.down = DeferrableLinear(4 * hidden, hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    return Block()


def _wall_worker(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    import copy

    import torch.distributed as dist
    from torch import nn

    from r1engine.pipeline import PipelineExecutor

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    h, shape, m, blocks = cfg["hidden"], (cfg["mbs"], cfg["seq"], cfg["hidden"]), cfg["m"], cfg["blocks"]
    torch.manual_seed(0)
    model = [_block(h) for _ in range(blocks)]
    inputs = [torch.randn(shape) for _ in range(m)]
    labels = [torch.randn(shape) for _ in range(m)]

    def crit(y, t):
        return torch.nn.functional.mse_loss(y, t) / m

    times = {}
    for kind in cfg["kinds"]:
        n_stages = 2 * world if kind == "dualpipev" else world
        per = blocks // n_stages
        stages = [nn.Sequential(*copy.deepcopy(model[i * per : (i + 1) * per])) for i in range(n_stages)]
        sched = build_schedule(kind, world, m)
        local = [stages[sched.stage_of_slot(rank, s)] for s in range(sched.modules_per_rank)]
        ex = PipelineExecutor(local, kind, p2p_shape=shape)
        samples = []
        for it in range(cfg["warmup"] + cfg["iters"]):
            for mod in local:
                mod.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            ex.step(inputs, labels, crit)
            dist.barrier()
            if it >= cfg["warmup"]:
                samples.append(time.perf_counter() - t0)
        times[kind] = statistics.median(samples)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def wallclock(cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_wall_worker, args=(cfg["world"], port, cfg, queue), nprocs=cfg["world"], join=True)
    return queue.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and a smaller wall-clock model")
    ap.add_argument("--no-wallclock", action="store_true")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    args = ap.parse_args()

    pps = (4, 8) if args.quick else (4, 8, 16)
    mults = (2, 4, 8) if args.quick else (2, 3, 4, 6, 8)
    lines = []
    lines.append(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}; date {datetime.date.today()}; commit {git_commit()}"
    )
    main_costs = Costs(f=1.0, b=2.0, w=1.0, fb=2.5)
    other_costs = Costs(f=1.0, b=2.4, w=0.6, fb=2.9)
    curves = None
    for title, costs in (
        ("F = W = 1, B = 2 (full backward), F&B = 2.5", main_costs),
        ("F = 1, B = 2.4, W = 0.6, F&B = 2.9 (unequal costs)", other_costs),
    ):
        t0 = time.perf_counter()
        rows, cv = simulate_table(costs, pps, mults)
        lines += [
            "",
            f"### Simulated bubble, {title}",
            "",
            "frac = sum of per-rank idle / (ranks * makespan); max/formula = largest per-rank bubble "
            "(makespan - busy) / the README formula. DualPipeV runs on PP/2 ranks.",
            "",
        ] + rows
        lines.append(f"\n(simulated {len(rows) - 2} x {len(KINDS)} schedules in {time.perf_counter() - t0:.2f} s)")
        curves = curves or cv
    lines += [
        "",
        "### Peak live activations per rank (max over ranks; M = 4PP)",
        "",
        "Chunks whose F ran and whose B has not (in brackets: until their deferred W ran). Per-rank memory "
        "is this times one stage's activations for one micro-batch.",
        "",
        "| PP | " + " | ".join(KINDS) + " |",
        "|---" * (1 + len(KINDS)) + "|",
    ]
    for pp in pps:
        cells = []
        for kind in KINDS:
            res = simulate(_schedule(kind, pp, 4 * pp), main_costs)
            cells.append(f"{max(res.peak_activations)} ({max(res.peak_activations_w)})")
        lines.append(f"| {pp} | " + " | ".join(cells) + " |")
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, "pipeline_bubble.png")
    plot(curves, pps, main_costs, png)
    lines.append(f"\nPlot: {os.path.relpath(png, os.path.dirname(RESULTS))}")

    if not args.no_wallclock:
        cfg = dict(
            world=4,
            blocks=8,
            hidden=96 if args.quick else 128,
            seq=32 if args.quick else 64,
            mbs=4,
            m=16,
            warmup=1,
            iters=2 if args.quick else 3,
            kinds=["1f1b", "zb1p", "dualpipe", "dualpipev"],
        )
        times = wallclock(cfg)
        base = times["1f1b"]
        lines += [
            "",
            "### CPU wall clock, 4 gloo processes (1 thread each)",
            "",
            f"Model: {cfg['blocks']} residual MLP blocks (hidden {cfg['hidden']}, 4x up), micro-batch "
            f"[{cfg['mbs']}, {cfg['seq']}, {cfg['hidden']}], M = {cfg['m']}; median of {cfg['iters']} steps "
            f"after {cfg['warmup']} warm-up. Baseline 1F1B.",
            "",
            "| schedule | stages x blocks | step time (s) | speed-up vs 1F1B |",
            "|---|---|---|---|",
        ]
        for kind in cfg["kinds"]:
            layout = "8 x 1" if kind == "dualpipev" else ("4 x 2 (each on 2 ranks)" if kind == "dualpipe" else "4 x 2")
            lines.append(f"| {kind} | {layout} | {times[kind]:.3f} | {base / times[kind]:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Pipeline schedules: benchmark results\n\nGenerated by `benchmarks/bench_pipeline.py`.\n\n")
            fh.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
