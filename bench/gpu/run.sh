#!/usr/bin/env bash
# The GPU benchmark in one command (≤ 8 min on one large NVIDIA GPU, no network):
#   bash bench/gpu/run.sh [--out results.json] [--steps 30] [--size 1024]
# 1. installs what the machine lacks from bench/gpu/wheels (python -m bench.gpu.fetch_wheels
#    fills it beforehand), 2. writes a full-size random-weight SDXL (tools/full_size.py) into a
# temporary Hugging Face cache, 3. runs python -m bench.gpu against it, offline: the scenarios
# at 30 steps, then the speed levers (bf16, --compile, lean activations, TTA) at 10 steps
# (--lever-steps), each row fail-soft, rows past --budget-s skipped; one JSON object on stdout.
# $PYTHON picks the interpreter (default python3); the cache is deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, transformers, safetensors, huggingface_hub, accelerate, PIL, psutil" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links bench/gpu/wheels -r bench/gpu/requirements.txt
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/multiplane-gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
"$PY" -m tools.full_size build --preset sdxl --hf-home "$WORK/hf" > "$WORK/build.log"
echo "full-size SDXL cache written in $(( $(date +%s) - start )) s" >&2
HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 MULTIPLANE_CACHE_DIR="$WORK/multiplane-cache" \
    "$PY" -m bench.gpu --model sdxl --device cuda "$@"
echo "total $(( $(date +%s) - start )) s" >&2
