"""One weight push of SmolLM2-135M-Instruct (+ one attached MTP layer) from the trainer to a rollout engine: into a
native engine in a worker process (`RemoteRolloutEngine`: broadcast over a gloo group, then loaded by the worker)
against the baseline, the in-process native engine's `sync_weights` (a copy in place), measured in the same run,
plus the remote push with several bucket sizes. Then `--workers` N worker processes: a `RolloutPool`'s update (one
weight group: one copy, one broadcast for all) against the same number of workers with a group each, updated one
after the other (what a pool did before it shared a group): time of a sync, and the trainer's copy of the weights
held while a push is in flight. Needs models/SmolLM2-135M-Instruct (bash scripts/fetch_smollm2.sh).

    python benchmarks/bench_weight_sync.py [--calls 5] [--threads 1] [--workers 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, time_per_call  # noqa: E402
from r1engine.models import PolicyModel  # noqa: E402
from r1engine.rollout import create_engine  # noqa: E402
from r1engine.rollout.pool import RolloutPool  # noqa: E402
from r1engine.rollout.remote import RemoteRolloutEngine  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each process")
    parser.add_argument("--workers", type=int, default=3, help="workers of the pool comparison (0: skip it)")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        print(f"skipped: {MODEL} is missing (bash scripts/fetch_smollm2.sh)")
        return
    torch.set_num_threads(args.threads)
    model = PolicyModel.from_pretrained(MODEL, num_mtp_layers=1)
    nbytes = sum(t.numel() * t.element_size() for _, t in model.named_weights())
    print(f"# weight sync, {machine()}")
    print(f"model: {MODEL.name} + 1 MTP layer, {nbytes / 2**20:.0f} MiB fp32, {args.calls} calls after a warm-up")

    local = create_engine("native", model=model)
    base = time_per_call(lambda: local.sync_weights(model), args.calls)
    print(f"in-process native sync_weights (baseline): {base * 1e3:8.1f} ms  {nbytes / base / 2**30:6.2f} GiB/s")
    local = None  # free its copy of the weights

    for bucket_mib in (16, 64, 256):
        with RemoteRolloutEngine("native", model=model, bucket_bytes=bucket_mib << 20, num_threads=args.threads) as eng:
            t = time_per_call(lambda eng=eng: eng.sync_weights(model), args.calls)
            worker = eng.last_sync["worker_seconds"]
            print(
                f"remote (gloo, {bucket_mib:3d} MiB buckets, {int(eng.last_sync['buckets']):3d} broadcasts): "
                f"{t * 1e3:8.1f} ms  {nbytes / t / 2**30:6.2f} GiB/s  x{t / base:.1f} the baseline "
                f"(worker side {worker * 1e3:.1f} ms)"
            )
    if args.workers > 0:
        compare_pool(model, args)


def _held_copy_bytes(engines) -> int:
    """Bytes of the trainer's flattened copies that the engines' pushes in flight hold (shared ones counted once)."""
    buffers = {b.data_ptr(): b.numel() for e in engines for b in e.push_buffers}
    return sum(buffers.values())


def compare_pool(model: PolicyModel, args: argparse.Namespace) -> None:
    n = args.workers
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as start_dir:
        model.save_pretrained(start_dir)

        def worker(w: int, group=None) -> RemoteRolloutEngine:
            shared = {"group": group, "rank": w + 1} if group is not None else {}
            return RemoteRolloutEngine("native", model_dir=start_dir, num_threads=args.threads, **shared)

        separate = [worker(w) for w in range(n)]
        try:
            t_separate = time_per_call(lambda: [e.sync_weights(model) for e in separate], args.calls)
            for e in separate:
                e.push_weights(model)
            held_separate = _held_copy_bytes(separate)
        finally:
            for e in separate:
                e.close()
        with RolloutPool.start(n, worker) as pool:
            t_pool = time_per_call(lambda: pool.sync_weights(model), args.calls)
            pool.push_weights(model)
            held_pool = _held_copy_bytes(pool.engines)
    print(f"{n} workers, one sync of all (ms); trainer's copy held during a push (MiB):")
    print(f"  a group per worker, one after the other (baseline): {t_separate * 1e3:8.1f} ms  "
          f"{held_separate / 2**20:6.0f} MiB")  # fmt: skip
    print(f"  RolloutPool, one group:                             {t_pool * 1e3:8.1f} ms  "
          f"{held_pool / 2**20:6.0f} MiB  ({t_separate / t_pool:.2f}x faster, "
          f"{held_separate / max(held_pool, 1):.1f}x less memory held)")  # fmt: skip


if __name__ == "__main__":
    main()
