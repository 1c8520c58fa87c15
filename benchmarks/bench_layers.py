"""Benchmark of the fused decoder-layer operators (r1engine.ops.rms_norm / swiglu / rope) on the CPU.

Per operator, forward and forward + backward wall time of

  cpp    the fused operator with the C++ kernels (backend "cpp", what "auto" picks for fp32/bf16 CPU tensors)
  fused-torch  the same operator with its PyTorch formulas (backend "torch": same saved tensors, no kernels)
  eager  the op-by-op PyTorch reference (`*_reference`, what PolicyModel computed before), the baseline

measured in the same run, interleaved (one call of each per repeat, median over repeats), at the shapes of

  demo   the tiny demo policy (`PolicyConfig.demo`: hidden 192, MLP 512, 6 heads / 2 KV heads of dim 32) on 2304
         tokens (9 packed 256-token sequences, as bench_vs_trl.py trains it)
  big    a Qwen2.5-0.5B-sized layer (hidden 896, MLP 4864, 14 heads of dim 64) on 4096 tokens

plus the bytes autograd saves for the backward (distinct storages, `torch.autograd.graph.saved_tensors_hooks`).

Whole model: `PolicyModel(PolicyConfig.demo(vocab_size=101, num_mtp_layers=0))` forward + backward of a
cross-entropy on 2304 packed tokens (9 x 256, cu_seqlens) with the fused ops vs with the op-by-op references
(`r1engine.settings.override(fused_layer_ops=False)`), time and saved-activation bytes, fp32 and bf16; and a
decode-like forward (8 sequences x 1 token, no grad), where only per-call overhead matters.

    OMP_NUM_THREADS=1 python benchmarks/bench_layers.py            # ~2 min on an idle core
    python benchmarks/bench_layers.py --repeats 5 --skip-model     # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / the extension start their OpenMP runtime

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import cpu_name, git_commit  # noqa: E402
from r1engine import _ext, ops, settings  # noqa: E402
from r1engine.models.config import PolicyConfig  # noqa: E402
from r1engine.models.policy import PolicyModel  # noqa: E402
from r1engine.ops.rms_norm import rms_norm_reference  # noqa: E402
from r1engine.ops.rope import rope_reference  # noqa: E402
from r1engine.ops.swiglu import swiglu_reference  # noqa: E402

SHAPES = {
    # name: (tokens, hidden, mlp, heads, head_dim)
    "demo": (2304, 192, 512, 6, 32),
    "big": (4096, 896, 4864, 14, 64),
}
VARIANTS = ("cpp", "fused-torch", "eager")


def saved_storages(fn: Callable[[], torch.Tensor]) -> dict[int, tuple[int, str]]:
    """The distinct storages autograd saves while `fn()` runs: data pointer -> (bytes, "shape dtype" of the first
    tensor saved on it)."""
    storages: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), (s.nbytes(), f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs (one count per storage)."""
    return sum(b for b, _ in saved_storages(fn).values())


def breakdown(storages: dict[int, tuple[int, str]], params: set[int]) -> dict[str, int]:
    """Saved bytes per "shape dtype" (parameters in one line)."""
    out: dict[str, int] = {}
    for ptr, (nbytes, what) in storages.items():
        key = "parameters" if ptr in params else what
        out[key] = out.get(key, 0) + nbytes
    return out


def time_interleaved(calls: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call; one call of each per repeat, repeat 0 (warm-up) not timed."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            dt = time.perf_counter() - t0
            if r > 0:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def op_cases(shape: str, dtype: torch.dtype) -> dict[str, tuple[Callable, tuple, Callable]]:
    """op name -> (fused entry point, inputs (leaves), reference)."""
    n, h, inter, heads, d = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def leaf(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()

    ang = torch.randn(1, n, d, generator=g) * 3
    return {
        "rms_norm": (ops.rms_norm, (leaf(n, h, scale=2.0), leaf(h)), lambda x, w: rms_norm_reference(x, w, 1e-6)),
        "swiglu": (ops.swiglu, (leaf(n, inter, scale=2.0), leaf(n, inter)), swiglu_reference),
        "rope": (ops.rope, (leaf(1, n, heads, d), ang.cos(), ang.sin()), rope_reference),
    }


def bench_ops(shape: str, repeats: int) -> list[dict]:
    rows = []
    for op, (fused, inputs, reference) in op_cases(shape, torch.float32).items():
        extra = (1e-6,) if op == "rms_norm" else ()
        fns = {
            "cpp": lambda f=fused, i=inputs, e=extra: f(*i, *e, backend="cpp"),
            "fused-torch": lambda f=fused, i=inputs, e=extra: f(*i, *e, backend="torch"),
            "eager": lambda r=reference, i=inputs: r(*i),
        }
        leaves = [t for t in inputs if t.requires_grad]
        dy = torch.randn_like(fns["eager"]())

        def fwd_bwd(
            fn, leaves=leaves, dy=dy
        ):  # gradients returned, not accumulated into .grad (that would add passes to every variant)
            return lambda: torch.autograd.grad(fn(), leaves, dy)

        def fwd_only(fn):
            def call():
                with torch.no_grad():
                    fn()

            return call

        t_fwd = time_interleaved({k: fwd_only(f) for k, f in fns.items()}, repeats)
        t_all = time_interleaved({k: fwd_bwd(f) for k, f in fns.items()}, repeats)
        saved = {k: saved_bytes(f) for k, f in fns.items()}
        rows.append({"op": op, "shape": shape, "fwd": t_fwd, "fwd_bwd": t_all, "saved": saved})
    return rows


def model_inputs(tokens: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    cu = torch.arange(0, tokens + 1, seq, dtype=torch.int32)
    return ids, targets, cu


def bench_model(dtype: torch.dtype, tokens: int, repeats: int) -> dict:
    cfg = PolicyConfig.demo(vocab_size=101, num_mtp_layers=0)
    model = PolicyModel(cfg).to(dtype)
    model.reset_parameters(seed=0)
    ids, targets, cu = model_inputs(tokens, 256, cfg.vocab_size)

    def loss() -> torch.Tensor:
        logits = model(ids, cu_seqlens=cu).logits
        return F.cross_entropy(logits[0].float(), targets[0])

    def step(fused: bool) -> Callable[[], None]:
        def call():
            with settings.override(fused_layer_ops=fused):
                model.zero_grad(set_to_none=True)
                loss().backward()

        return call

    t = time_interleaved({"fused": step(True), "reference": step(False)}, repeats)
    saved, parts = {}, {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name, fused in (("fused", True), ("reference", False)):
        with settings.override(fused_layer_ops=fused):
            storages = saved_storages(loss)
        saved[name] = sum(b for b, _ in storages.values())
        parts[name] = breakdown(storages, params)
    # Decode-like call: 8 sequences x 1 new token (position 37), no grad; per-call overhead dominates.
    dec_ids = torch.randint(0, cfg.vocab_size, (8, 1), generator=torch.Generator().manual_seed(2))
    pos = torch.full((8, 1), 37)

    def decode(fused: bool) -> Callable[[], None]:
        def call():
            with settings.override(fused_layer_ops=fused), torch.no_grad():
                model(dec_ids, position_ids=pos)

        return call

    t_dec = time_interleaved({"fused": decode(True), "reference": decode(False)}, repeats * 10)
    return {"dtype": dtype, "time": t, "saved": saved, "parts": parts, "decode": t_dec}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def fmt_mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per variant (the model: a third of it)")
    ap.add_argument("--tokens", type=int, default=2304, help="packed tokens of the whole-model run (256 per seq)")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    for name in ("rms_norm_fwd", "swiglu_fwd", "rope_fwd"):
        _ext.require(name)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(
        f"# {cpu_name()}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, extension {_ext.build_info()}, commit {git_commit()}"
    )

    print(
        "\n| op | shape (tokens x width) | fwd eager | fwd cpp | eager/cpp | fwd+bwd eager | fwd+bwd fused-torch "
        "| fwd+bwd cpp | eager/cpp | saved eager | saved fused | fused/eager |"
    )
    print("|---" * 12 + "|")
    for shape in args.shapes:
        n, h, inter, heads, d = SHAPES[shape]
        widths = {"rms_norm": f"{h}", "swiglu": f"{inter}", "rope": f"{heads}x{d}"}
        for r in bench_ops(shape, args.repeats):
            f, a, s = r["fwd"], r["fwd_bwd"], r["saved"]
            print(
                f"| {r['op']} | {shape}: {n} x {widths[r['op']]} | {fmt_ms(f['eager'])} | {fmt_ms(f['cpp'])} "
                f"| {f['eager'] / f['cpp']:.2f}x | {fmt_ms(a['eager'])} | {fmt_ms(a['fused-torch'])} "
                f"| {fmt_ms(a['cpp'])} | **{a['eager'] / a['cpp']:.2f}x** | {fmt_mib(s['eager'])} "
                f"| {fmt_mib(s['cpp'])} | {s['cpp'] / s['eager']:.2f} |",
                flush=True,
            )
            assert s["cpp"] == s["fused-torch"], "both backends of a fused op save the same tensors"

    if args.skip_model:
        return
    print(
        f"\n| PolicyModel demo (3 layers, vocab 101), {args.tokens} packed tokens | fwd+bwd reference ops "
        "| fwd+bwd fused ops | reference/fused | saved reference | saved fused | fused/reference "
        "| decode 8x1 reference | decode 8x1 fused | reference/fused |"
    )
    print("|---" * 10 + "|")
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        m = bench_model(dtype, args.tokens, max(3, args.repeats // 3))
        results.append(m)
        t, s, dec = m["time"], m["saved"], m["decode"]
        print(
            f"| {str(dtype).removeprefix('torch.')} | {fmt_ms(t['reference'])} | {fmt_ms(t['fused'])} "
            f"| **{t['reference'] / t['fused']:.2f}x** | {fmt_mib(s['reference'])} | {fmt_mib(s['fused'])} "
            f"| **{s['fused'] / s['reference']:.2f}** | {fmt_ms(dec['reference'])} | {fmt_ms(dec['fused'])} "
            f"| {dec['reference'] / dec['fused']:.2f}x |",
            flush=True,
        )

    print(
        "\n| saved for the backward, by tensor (shape dtype) | "
        + " | ".join(
            f"{str(m['dtype']).removeprefix('torch.')} reference | {str(m['dtype']).removeprefix('torch.')} fused"
            for m in results
        )
        + " |"
    )
    print("|---" * (1 + 2 * len(results)) + "|")
    keys = sorted(
        {k for m in results for p in m["parts"].values() for k in p},
        key=lambda k: -max(p.get(k, 0) for m in results for p in m["parts"].values()),
    )
    for k in keys:
        cells = " | ".join(
            f"{fmt_mib(m['parts']['reference'].get(k, 0))} | {fmt_mib(m['parts']['fused'].get(k, 0))}" for m in results
        )
        print(f"| {k} | {cells} |")


if __name__ == "__main__":
    main()
