#!/usr/bin/env bash
# Compile-check every CUDA source for sm_90 with nvcc (no GPU needed), against the torch headers of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "[cuda] no CUDA sources"; exit 0; fi
if ! command -v nvcc >/dev/null; then echo "[cuda] nvcc not found: cannot compile-check ${files[*]}" >&2; exit 1; fi
torch_dir=$($PY -c "import torch, os; print(os.path.dirname(torch.__file__))")
py_inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# The CPU torch wheel lacks this generated header of c10/cuda; a stub lets the real CUDA-stream path compile.
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
for f in "${files[@]}"; do
  echo "[cuda] nvcc -arch=sm_90 $f"
  nvcc -std=c++20 -arch=sm_90 -O2 -c "$f" -o /dev/null -Icsrc -I"$stub" -I"$torch_dir/include" \
    -I"$torch_dir/include/torch/csrc/api/include" -I"$py_inc" -DR1ENGINE_WITH_CUDA \
    -D_GLIBCXX_USE_CXX11_ABI=1 --expt-relaxed-constexpr -Xcompiler -fPIC
done
echo "[cuda] ${#files[@]} file(s) compiled"
