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

echo "[test] real-model example (SmolLM2-135M-Instruct; its tests are skipped, saying so, if this fails)"
bash scripts/fetch_smollm2.sh || echo "[test] could not fetch SmolLM2-135M-Instruct" >&2

echo "[test] pytest"
$PY -m pytest tests "$@"
