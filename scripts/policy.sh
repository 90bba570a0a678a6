#!/usr/bin/env bash
# Dataset-level policies vs per-image search on the 128-px models: fits on fashion-mnist:val,
# evaluates on the test split, writes results/<arch>_policy.{json,png}, then re-renders the
# results section of docs/results-128px.md (scripts/render_results.py).
# Resumable: a finished part is kept in the JSON; rerun the same command to go on.
# Usage: bash scripts/policy.sh [resnet18 mobilenetv2_100 pvt_v2_b0]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
ARCHS=${*:-resnet18 mobilenetv2_100 pvt_v2_b0}
VAL=${VAL:-500} LIMIT=${LIMIT:-1000} THREADS=${THREADS:-0}
for a in $ARCHS; do
  .venv/bin/undiscard fit-policy "zoo/fmnist_$a.safetensors" --val-images "$VAL" --limit "$LIMIT" \
    --max-budget 10 --threads "$THREADS" --json "results/${a}_policy.json" --plot "results/${a}_policy.png"
done
.venv/bin/python scripts/render_results.py
