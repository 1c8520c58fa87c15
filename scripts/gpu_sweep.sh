#!/usr/bin/env bash
# The GPU sweep: one prepared call on a lent GPU machine (nothing there can be fetched; its python3 holds torch,
# triton and transformers). Builds r1engine._C with the CUDA kernels for sm_90, runs every test that needs a GPU,
# then the GPU benchmarks, writing full logs and the benchmark reports under $OUT (default: ./gpu-sweep) and a
# short summary last. Usage on the device machine, from the repository root:
#     bash scripts/gpu_sweep.sh            # about 6-8 minutes on an H100
#     SWEEP_BENCH=0 bash scripts/gpu_sweep.sh   # build + tests only
#     SWEEP_ASYNC=1 bash scripts/gpu_sweep.sh   # and the rollout modes' comparison on the GPU (issue 20: sync
#                                               # against one_step_off and async, demo task, native engine)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-sweep}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=()

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember pass/fail
  local name=$1
  shift
  local t0=$SECONDS
  echo "[sweep] $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then status+=("$name: ok ($((SECONDS - t0)) s)")
  else status+=("$name: FAILED ($((SECONDS - t0)) s; see $name.log)"); tail -n 30 "$OUT/$name.log"; fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c \
  "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The extension with the CUDA kernels (TORCH_CUDA_ARCH_LIST picks sm_90; MAX_JOBS: the machine has 16 cores).
step build env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py --quiet build_ext --inplace
step import $PY -c "import torch, r1engine._C; from r1engine import _ext; assert _ext.cuda_compiled(), 'no CUDA'; \
print(torch.ops.r1engine.logprobs_fwd)"

# Every test that skips without a GPU, plus the CPU suites of the same ops (cheap here).
step tests_gpu $PY -m pytest -q -p no:cacheprovider tests/test_cuda_grpo_loss.py tests/test_triton_grpo_loss.py \
  tests/test_triton_linear_grpo_loss.py tests/test_triton_sm90_codegen.py tests/test_ops_layers.py \
  tests/test_packing_attention.py tests/test_ops_grpo_loss.py tests/test_algo_policy_loss.py

if [ "${SWEEP_BENCH:-1}" = 1 ]; then
  step bench_grpo_loss $PY benchmarks/bench_grpo_loss_gpu.py --out "$OUT/grpo_loss_gpu.md"
  [ -f benchmarks/bench_loss_path.py ] && step bench_loss_path $PY benchmarks/bench_loss_path.py
fi
# Trainer and rollout worker share the one GPU (two processes; weights travel over gloo, as NCCL needs a GPU each).
if [ "${SWEEP_ASYNC:-0}" = 1 ]; then
  step bench_async_rl $PY benchmarks/bench_async_rl.py --steps 20 --eval-every 10 \
    --modes sync,sync_remote,one_step_off,async --out "$OUT/async_rl_gpu.md"
fi

echo
echo "[sweep] summary ($(head -n 1 "$OUT/device.txt"))"
printf '  %s\n' "${status[@]}"
grep -hE "passed|failed" "$OUT"/tests_*.log | tail -n 3
