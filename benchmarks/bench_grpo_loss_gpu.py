"""GPU benchmark of the fused GRPO loss: logits-in (Triton, CUDA) and lm_head-fused (Triton), forward + backward.

Logits-in (N=16384 tokens, V=151936, bf16): median time of r1engine's Triton and CUDA backends against eager
PyTorch (the autograd reference `r1engine.algo.loss.grpo_loss_reference`), `torch.compile` of that reference and
Liger-Kernel's Triton GRPO op (`liger_kernel.transformers.grpo_loss.triton_grpo_loss`, if importable); achieved
bandwidth (fwd reads the logits once, bwd reads them and writes the gradient: 3 x N x V x 2 bytes) against a
device-to-device copy measured in the same run; peak memory above the logits themselves.

lm_head-fused (N=16384; H=3584/V=152064 and H=896/V=151936, bf16): effective TFLOP/s counting 8 x N x H x V for
forward + backward, for r1engine's Triton kernel, its chunked-torch backend, eager PyTorch (materialized logits) and
Liger's `LigerFusedLinearGRPOLoss` (if importable); peak memory.

    python benchmarks/bench_grpo_loss_gpu.py                    # full run on a CUDA GPU (H100: a few minutes)
    python benchmarks/bench_grpo_loss_gpu.py --out benchmarks/results/grpo_loss_gpu.md
    python benchmarks/bench_grpo_loss_gpu.py --smoke            # tiny sizes on CPU (TRITON_INTERPRET=1)

Timing: `triton.testing.do_bench` (median, with warm-up) on a GPU; perf_counter medians in --smoke mode. Inputs
are random and never zero; every provider is checked against the eager result before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, git_commit  # noqa: E402

HP = dict(eps_low=0.2, eps_high=0.28, beta=0.04, temperature=0.9)


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers


def _bench(fn: Callable[[], object], smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if not smoke:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated during fn() above what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


class Table:
    def __init__(self, title: str, cols: list[str]):
        self.title, self.cols, self.rows = title, cols, []

    def add(self, *row: object) -> None:
        self.rows.append([str(r) for r in row])
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.cols) + " |", "|" + "---|" * len(self.cols)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# logits-in


def _logits_problem(n: int, v: int, dtype: torch.dtype, device: torch.device, seq: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    b = max(1, n // seq)
    t = n // b
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype).to(device)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    with torch.no_grad():
        lp = torch.empty(b, t, device=device)
        for i in range(b):  # row-chunked so the fp32 reference copy stays small
            lp[i] = torch.log_softmax(logits[i].float(), -1).gather(-1, targets[i, :, None]).squeeze(-1)
    old = lp + 0.2 * torch.randn(b, t, generator=g).to(device)
    ref = lp + 0.2 * torch.randn(b, t, generator=g).to(device)
    return logits, targets, adv, mask, old, ref


def bench_logits_in(n: int, v: int, smoke: bool, device: torch.device) -> Table:
    from r1engine import _ext
    from r1engine.algo.loss import grpo_loss_reference
    from r1engine.ops import grpo_loss

    dtype = torch.bfloat16
    logits, targets, adv, mask, old, ref = _logits_problem(n, v, dtype, device, seq=min(2048, n))
    x = logits.detach().requires_grad_()

    def run_ours(backend: str, inplace: bool = False):
        def f():
            src = x
            if inplace:  # the in-place backward consumes its logits buffer: give it one to overwrite
                with torch.no_grad():
                    scratch.copy_(logits)
                src = scratch.detach().requires_grad_()
            loss, _ = grpo_loss(src, targets, adv, mask, old, ref, backend=backend, inplace_backward=inplace, **HP)
            return torch.autograd.grad(loss, src)[0]

        return f

    scratch = torch.empty_like(logits)

    def eager():
        loss, _ = grpo_loss_reference(x, targets, adv, mask, old, ref, **HP)
        return torch.autograd.grad(loss, x)[0]

    providers: list[tuple[str, Callable[[], torch.Tensor]]] = [("eager PyTorch (reference)", eager)]
    if not smoke:
        compiled_ref = torch.compile(grpo_loss_reference)

        def compiled():
            loss, _ = compiled_ref(x, targets, adv, mask, old, ref, **HP)
            return torch.autograd.grad(loss, x)[0]

        providers.append(("torch.compile(reference)", compiled))
    liger_note = ""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        if device.type != "cuda":
            raise ImportError("Liger's Triton op needs a GPU")
        pad = torch.cat([x.detach(), x.detach()[:, :1]], dim=1)  # Liger takes logits [B, L+1, V]

        def liger():
            with torch.no_grad():
                scratch_l.copy_(pad)
            lg = scratch_l.detach().requires_grad_()
            out = triton_grpo_loss(
                lg,
                old,
                ref,
                targets,
                adv,
                mask.int(),
                temperature=HP["temperature"],
                beta=HP["beta"],
                eps_low=HP["eps_low"],
                eps_high=HP["eps_high"],
                inplace=True,
                loss_type="grpo",
            )
            loss = out[0] if isinstance(out, (tuple, list)) else out
            return torch.autograd.grad(loss.sum(), lg)[0]

        scratch_l = torch.empty_like(pad)
        providers.append(("Liger triton_grpo_loss (inplace)", liger))
    except Exception as exc:  # noqa: BLE001  (a benchmark peer: report why it is missing and go on)
        liger_note = f"Liger-Kernel's Triton GRPO op not measured: {type(exc).__name__}: {exc}"
        print("  " + liger_note)
    providers.append(("r1engine triton", run_ours("triton")))
    providers.append(("r1engine triton, inplace bwd", run_ours("triton", inplace=True)))
    if device.type == "cuda" and _ext.cuda_compiled():
        providers.append(("r1engine cuda", run_ours("cuda")))
        providers.append(("r1engine cuda, inplace bwd", run_ours("cuda", inplace=True)))

    bytes_moved = 3 * n * v * logits.element_size()
    dst = torch.empty_like(logits)
    copy_ms = _bench(lambda: dst.copy_(logits), smoke)
    copy_gbs = 2 * n * v * logits.element_size() / copy_ms / 1e6
    table = Table(
        f"logits-in GRPO loss, fwd+bwd, N={n}, V={v}, {str(dtype).replace('torch.', '')} "
        f"(device-to-device copy: {copy_gbs:.0f} GB/s)",
        ["provider", "ms", "speed-up vs eager", "GB/s", "% of copy BW", "peak extra MiB", "max |grad - eager|"],
    )
    print(table.title)
    want = eager()
    base_ms = None
    for name, fn in providers:
        try:
            err = (fn().float() - want.float()).abs().max().item()
            ms = _bench(fn, smoke)
        except Exception as exc:  # noqa: BLE001  (e.g. a peer's API changed, or out of memory: report, go on)
            table.add(name, f"failed: {type(exc).__name__}: {str(exc)[:120]}", *["-"] * (len(table.cols) - 2))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        base_ms = base_ms or ms
        gbs = bytes_moved / ms / 1e6
        table.add(
            name,
            f"{ms:.3f}",
            f"{base_ms / ms:.2f}x",
            f"{gbs:.0f}",
            f"{100 * gbs / copy_gbs:.0f}%",
            _fmt(_peak_extra_mb(fn, device), ".0f"),
            f"{err:.2e}",
        )
    if liger_note:
        table.rows.append([liger_note] + ["-"] * (len(table.cols) - 1))
    return table


# ---------------------------------------------------------------------------------------------------------------
# lm_head-fused


def bench_linear(n: int, h: int, v: int, smoke: bool, device: torch.device) -> Table:
    from r1engine.algo.loss import grpo_loss_reference
    from r1engine.ops.linear_grpo_loss import linear_grpo_loss

    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(1)
    seq = min(2048, n)
    b, t = max(1, n // seq), seq
    hidden = torch.randn(b, t, h, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    with torch.no_grad():
        lp = torch.empty(b, t, device=device)
        for i in range(b):
            z = (hidden[i] @ weight.T).float() / HP["temperature"]
            lp[i] = torch.log_softmax(z, -1).gather(-1, targets[i, :, None]).squeeze(-1)
            del z
    old = lp + 0.2 * torch.randn(b, t, generator=g).to(device)
    ref = lp + 0.2 * torch.randn(b, t, generator=g).to(device)

    def ours(backend: str):
        def f():
            loss, _ = linear_grpo_loss(hidden, weight, targets, adv, mask, old, ref, backend=backend, **HP)
            return torch.autograd.grad(loss, [hidden, weight])

        return f

    def eager():
        loss, _ = grpo_loss_reference(hidden @ weight.T, targets, adv, mask, old, ref, **HP)
        return torch.autograd.grad(loss, [hidden, weight])

    providers = [("eager PyTorch (materialized logits)", eager), ("r1engine torch (chunked)", ours("torch"))]
    liger_note = ""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        if device.type != "cuda":
            raise ImportError("benchmarked on GPU only")
        mod = LigerFusedLinearGRPOLoss(
            beta=HP["beta"],
            epsilon_low=HP["eps_low"],
            epsilon_high=HP["eps_high"],
            temperature=HP["temperature"],
            use_ref_model=True,
            loss_type="grpo",
        )

        def liger():
            out = mod(hidden, weight, targets, mask.int(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss = out[0] if isinstance(out, (tuple, list)) else out
            return torch.autograd.grad(loss, [hidden, weight])

        providers.append(("Liger LigerFusedLinearGRPOLoss", liger))
    except Exception as exc:  # noqa: BLE001
        liger_note = f"Liger's LigerFusedLinearGRPOLoss not measured: {type(exc).__name__}: {exc}"
        print("  " + liger_note)
    providers.append(("r1engine triton (fused)", ours("triton")))

    flops = 8 * n * h * v
    table = Table(
        f"lm_head-fused GRPO loss, fwd+bwd, N={n}, H={h}, V={v}, bf16 (8*N*H*V = {flops / 1e12:.2f} TFLOP)",
        ["provider", "ms", "TFLOP/s", "speed-up vs eager", "peak extra MiB", "max rel |dW - eager|"],
    )
    print(table.title)
    want = eager()
    base_ms = None
    for name, fn in providers:
        try:
            got = fn()
            err = ((got[1].float() - want[1].float()).abs().max() / want[1].float().abs().max()).item()
            del got
            ms = _bench(fn, smoke)
        except Exception as exc:  # noqa: BLE001  (e.g. a peer's API changed, or out of memory: report, go on)
            table.add(name, f"failed: {type(exc).__name__}: {str(exc)[:120]}", *["-"] * (len(table.cols) - 2))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        base_ms = base_ms or ms
        table.add(
            name,
            f"{ms:.2f}",
            f"{flops / ms / 1e9:.1f}",
            f"{base_ms / ms:.2f}x",
            _fmt(_peak_extra_mb(fn, device), ".0f"),
            f"{err:.2e}",
        )
    if liger_note:
        table.rows.append([liger_note] + ["-"] * (len(table.cols) - 1))
    return table


# ---------------------------------------------------------------------------------------------------------------


def _header(device: torch.device) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    import triton

    return (
        f"- device: {dev}\n- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- git commit: {git_commit()}\n- torch {torch.__version__}, triton {triton.__version__}\n"
        f"- command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--n", type=int, default=16384, help="tokens (default 16384)")
    ap.add_argument("--skip-logits", action="store_true", help="skip the logits-in benchmark")
    ap.add_argument("--skip-linear", action="store_true", help="skip the lm_head-fused benchmark")
    ap.add_argument("--out", help="also write the tables as markdown to this file")
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        logits_shapes, linear_shapes = [(48, 300)], [(48, 32, 300)]
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_grpo_loss_gpu.py needs a CUDA GPU (use --smoke to exercise the script on CPU)")
        device = torch.device("cuda")
        logits_shapes = [(args.n, 151936)]
        linear_shapes = [(args.n, 3584, 152064), (args.n, 896, 151936)]
    header = _header(device)
    print(header)
    tables = []
    if not args.skip_logits:
        tables += [bench_logits_in(n, v, args.smoke, device) for n, v in logits_shapes]
    if not args.skip_linear:
        tables += [bench_linear(n, h, v, args.smoke, device) for n, h, v in linear_shapes]
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# GRPO loss on GPU: measured results\n\n" + header + "\n" + "\n".join(t.markdown() for t in tables)
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
