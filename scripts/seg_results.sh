#!/usr/bin/env bash
# The segmentation section of docs/segmentation.md, end to end:
#   1. trains zoo/fmnist_seg_{deeplabv3,segformer}.safetensors if missing (scripts/train_seg.sh);
#   2. evaluates both on the first LIMIT fashion-mnist-seg:test canvases at B = 1, 4, 10
#      (criterion entropy, aggregates mean and entropy) -> results/seg_*.json and .png;
#   3. renders the section between <!-- seg:start --> and <!-- seg:end --> (scripts/render_seg.py).
# Each step is skipped when its output exists (delete results/seg_*.json to redo it) and
# resumes from its partial file when interrupted. LIMIT (default 2000, the shipped results;
# 5000 = the whole split) and THREADS (default 1: timings stay comparable on a shared CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LIMIT="${LIMIT:-2000}"
THREADS="${THREADS:-1}"
mkdir -p results
THREADS="$THREADS" bash scripts/train_seg.sh
for key in deeplabv3 segformer; do
  out="results/seg_${key}.json"
  [[ -f "$out" ]] && { echo "exists: $out (delete it to redo)"; continue; }
  "$PY" -m undiscard eval "zoo/fmnist_seg_${key}.safetensors" --task segmentation --data fashion-mnist-seg:test \
      --limit "$LIMIT" --budget 1,4,10 --aggregate mean,entropy --criterion entropy --batch-size 32 \
      --timing-images 16 --repeats 3 --threads "$THREADS" --json "$out" --plot "results/seg_${key}.png"
done
"$PY" scripts/render_seg.py
