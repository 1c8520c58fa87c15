"""CPU benchmark of the fused GRPO loss (C++ kernel) against eager PyTorch and torch.compile of the same math.

Measures forward + backward wall time (median of repeats) and peak extra memory of:

* ``cpp-inplace``: ``r1engine.ops.grpo_loss(..., backend="cpp", inplace_backward=True)`` (gradient written into
  the logits buffer);
* ``cpp``:         the same with a separate gradient tensor;
* ``eager``:       the PyTorch reference (``log_softmax`` + ``gather`` + clipped surrogate + k3 KL + aggregation);
* ``compile``:     ``torch.compile(fullgraph=True)`` of that same reference function;

at N = 4096 tokens (B=8 x T=512), fp32, V = 32000 and 151936 (Qwen2.5), with old/ref log-probs, beta=0.04 and the
paper's seq-mean-token-mean aggregation (all tokens unmasked: the kernel's worst case, as masked tokens are free).

Memory is measured honestly for torch's CPU allocations: each case runs in a fresh subprocess, which resets its
resident-set high-water mark (``/proc/self/clear_refs`` = 5) right before the measured iteration and reads
``VmHWM`` afterwards; "extra" is that peak minus the resident set before the iteration (inputs, logits and
warm-up state excluded; the gradient, when it is a new tensor, is included), shown as % of the logits' bytes.

Usage: ``python benchmarks/bench_grpo_loss_cpu.py`` (default: both vocabularies, all cases, ~3 min on 2 cores);
``--vocab 32000 --repeats 3 --cases cpp-inplace eager`` to narrow it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("cpp-inplace", "cpp", "eager", "compile")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(case: str, n: int, vocab: int, repeats: int, seed: int) -> dict:
    import torch

    import r1engine.ops as ops
    from r1engine.algo.kl import kl_k3
    from r1engine.algo.loss import aggregation_weights, clipped_surrogate

    torch.manual_seed(seed)
    b = 8
    t = n // b
    base = (torch.randn(b * t, vocab) * 2.0).requires_grad_()
    targets = torch.randint(0, vocab, (b, t))
    adv = torch.randn(b)
    mask = torch.ones(b, t)
    with torch.no_grad():
        lp = ops.token_logprobs(base.view(b, t, vocab), targets, backend="cpp")  # fast setup; same values
        old = lp + 0.1 * torch.randn(b, t)
        ref = lp + 0.1 * torch.randn(b, t)
        del lp
    beta = 0.04
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, kl_estimator="k3", agg="seq-mean-token-mean")

    def reference(x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(x, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        s, _ = clipped_surrogate(torch.exp(logp - old), adv[:, None], 0.2, 0.28)
        w = aggregation_weights(mask, "seq-mean-token-mean")
        return (w * (-s + beta * kl_k3(logp, ref))).sum()

    compiled_ref = torch.compile(reference, fullgraph=True) if case == "compile" else None

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        x = base.view(b, t, vocab)  # a non-leaf view, like the lm_head output
        if case in ("cpp-inplace", "cpp"):
            loss, _ = ops.grpo_loss(
                x, targets, adv, mask, old, ref, backend="cpp", inplace_backward=case == "cpp-inplace", **kw
            )
        elif case == "eager":
            loss = reference(x)
        else:
            loss = compiled_ref(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    warm = 0.0
    first_loss = None
    if case != "eager":  # eager has no one-time cost worth excluding; compile compiles here
        t0 = time.perf_counter()
        first_loss, _ = step()
        warm = time.perf_counter() - t0
    times = []
    extra_kib = None
    inplace_alias = None
    for i in range(repeats):
        rss0 = _rss_kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        loss, grad = step()
        times.append(time.perf_counter() - t0)
        if first_loss is None:
            first_loss = loss
        if i == 0:
            extra_kib = _rss_kib("VmHWM") - rss0
            inplace_alias = grad.data_ptr() == base.data_ptr()
        del grad
    return {
        "case": case,
        "vocab": vocab,
        "n": n,
        "times": times,
        "median_s": statistics.median(times),
        "warmup_s": warm,
        "extra_peak_bytes": extra_kib * 1024,
        "logits_bytes": base.numel() * base.element_size(),
        "grad_is_logits_buffer": inplace_alias,
        "loss": float(first_loss),  # on the original logits (in-place runs overwrite them)
        "threads": torch.get_num_threads(),
    }


def _run_case(case: str, n: int, vocab: int, repeats: int, seed: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        case,
        "--n",
        str(n),
        "--vocab",
        str(vocab),
        "--repeats",
        str(repeats),
        "--seed",
        str(seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} V={vocab} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="tokens (B=8 sequences of n/8)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 3 for V<=64k, else 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.vocab[0], args.repeats or 1, args.seed)))
        return

    import torch

    print(
        f"# GRPO loss fwd+bwd on CPU, N={args.n}, fp32, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        "| V | case | fwd+bwd median (s) | repeats | extra peak memory | % of logits | eager / case | compile / case |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    t_start = time.perf_counter()
    for vocab in args.vocab:
        repeats = args.repeats or (3 if vocab <= 65536 else 1)
        res = {case: _run_case(case, args.n, vocab, repeats, args.seed) for case in args.cases}
        for case, r in res.items():
            pct = 100.0 * r["extra_peak_bytes"] / r["logits_bytes"]
            eager = res.get("eager", {}).get("median_s")
            comp = res.get("compile", {}).get("median_s")
            ratio_e = f"{eager / r['median_s']:.2f}x" if eager else "-"
            ratio_c = f"{comp / r['median_s']:.2f}x" if comp else "-"
            print(
                f"| {vocab} | {case} | {r['median_s']:.3f} | {len(r['times'])} | "
                f"{r['extra_peak_bytes'] / 2**20:.0f} MiB | {pct:.1f}% | {ratio_e} | {ratio_c} |",
                flush=True,
            )
            summary.append(r)
        losses = {c: r["loss"] for c, r in res.items()}
        if len(set(round(v, 4) for v in losses.values())) > 1:
            print(f"WARNING: losses differ between cases at V={vocab}: {losses}")
        if "cpp-inplace" in res:
            assert res["cpp-inplace"]["grad_is_logits_buffer"], "in-place backward did not reuse the logits buffer"
    print(
        f"# total {time.perf_counter() - t_start:.0f} s; logits {args.n} x V fp32; extra memory = peak RSS during "
        "one fwd+bwd minus RSS before it (the new gradient tensor counts for cpp/eager/compile)"
    )


if __name__ == "__main__":
    main()
