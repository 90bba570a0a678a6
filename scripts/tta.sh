#!/usr/bin/env bash
# Image-space TTA baselines without and with recovered activations on the 128-px models:
# `undiscard tta-study` per model -> results/tta_<arch>.json, then the <!-- tta:start/end -->
# section of docs/tta.md (scripts/render_tta.py).
# Logits are cached under runs/cache: a rerun (or an interrupted run) reuses them.
# Usage: bash scripts/tta.sh [resnet18 mobilenetv2_100 pvt_v2_b0]
# CPU defaults (the shipped results): VAL=500 LIMIT=1000 POOL=20 TOTALS=10,20 FEAT=5.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
ARCHS=${*:-resnet18 mobilenetv2_100 pvt_v2_b0}
VAL=${VAL:-500} LIMIT=${LIMIT:-1000} POOL=${POOL:-20} TOTALS=${TOTALS:-10,20} FEAT=${FEAT:-5} THREADS=${THREADS:-0}
for a in $ARCHS; do
  [[ -f "results/tta_$a.json" && -z "${FORCE:-}" ]] && { echo "exists: results/tta_$a.json (FORCE=1 to redo)"; continue; }
  rm -f "results/tta_$a.json"  # FORCE: redone (the cached logits are reused); tta-study keeps a report of other arguments
  .venv/bin/undiscard tta-study "zoo/fmnist_$a.safetensors" --tta-val-images "$VAL" --limit "$LIMIT" \
    --tta-pool "$POOL" --totals "$TOTALS" --feature-budget "$FEAT" --threads "$THREADS" --json "results/tta_$a.json"
done
.venv/bin/python scripts/render_tta.py
