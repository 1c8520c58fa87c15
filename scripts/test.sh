#!/usr/bin/env bash
# The project's test command (README quick start and .ci/run): set up, lint, C++ unit tests,
# CUDA compile check, then the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"  # ninja, cmake helpers from the venv when the system lacks them

echo "[test] ruff"
.venv/bin/ruff check r1engine kernels tests benchmarks examples setup.py

echo "[test] C++ core (cmake + ctest)"
cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-cmake -j "${MAX_JOBS:-2}" >/dev/null
ctest --test-dir build-cmake --output-on-failure

bash scripts/check_cuda.sh

echo "[test] pytest"
$PY -m pytest tests "$@"
