"""One weight push of SmolLM2-135M-Instruct (+ one attached MTP layer) from the trainer to a rollout engine: into a
native engine in a worker process (`RemoteRolloutEngine`: broadcast over a gloo group, then loaded by the worker)
against the baseline, the in-process native engine's `sync_weights` (a copy in place), measured in the same run,
plus the remote push with several bucket sizes. Needs models/SmolLM2-135M-Instruct (bash scripts/fetch_smollm2.sh).

    python benchmarks/bench_weight_sync.py [--calls 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, time_per_call  # noqa: E402
from r1engine.models import PolicyModel  # noqa: E402
from r1engine.rollout import create_engine  # noqa: E402
from r1engine.rollout.remote import RemoteRolloutEngine  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each process")
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


if __name__ == "__main__":
    main()
