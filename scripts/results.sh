#!/usr/bin/env bash
# Regenerate every number of the results section of docs/results-128px.md, then the section itself.
#   bash scripts/results.sh                      # everything (CPU: about 80 minutes on 2 cores)
#   bash scripts/results.sh resnet18 ablation    # some stages: zoo model names and/or 'ablation'
# CPU defaults (the shipped results): LIMIT=2000 SLICE=1000 AGG_IMAGES=1000.
# Each step is skipped when its output exists (delete the results/*.json to redo it) and
# resumes from its partial file when interrupted. THREADS=n sets torch's CPU threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
U="$PY -m undiscard"
T=(--threads "${THREADS:-0}")
ABL="${ABL:-resnet18}"          # the model of the ablation table
LIMIT="${LIMIT:-2000}"          # main tables: the first LIMIT test images (10000 = all)
SLICE="${SLICE:-1000}"          # ablations and single states: the first SLICE test images
AGG_IMAGES="${AGG_IMAGES:-1000}" # training images of the aggregators
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(resnet18 mobilenetv2_100 pvt_v2_b0 ablation)
mkdir -p results runs

model_stage() {
  local arch="$1" m="zoo/fmnist_$1.safetensors" agg="zoo/fmnist_$1.aggregator.safetensors"
  [[ -f "$agg" ]] || $U train-aggregator "$m" --out "$agg" --images "$AGG_IMAGES" --seed 0 "${T[@]}"
  [[ -f "results/${arch}.json" ]] || $U eval "$m" --criterion entropy --aggregate mean,entropy,attention \
      --aggregator "$agg" --budget 1,2,4,8,16 --limit "$LIMIT" --json "results/${arch}.json" --plot "results/${arch}.png" "${T[@]}"
  [[ -f "results/${arch}_single.json" ]] || $U eval "$m" --budget 1 --aggregate mean --single-states \
      --limit "$SLICE" --json "results/${arch}_single.json" "${T[@]}"
}

ablation_stage() {
  local m="zoo/fmnist_${ABL}.safetensors" agg="zoo/fmnist_${ABL}.aggregator.safetensors"
  local noalign="runs/fmnist_${ABL}.aggregator-noalign.safetensors"
  [[ -f "$agg" ]] || model_stage "$ABL"
  [[ -f results/ablation_criteria.json ]] || $U eval "$m" --criterion random,displacement,entropy,learned \
      --aggregate mean,entropy,attention --aggregator "$agg" --budget 1,2,4,8 --limit "$SLICE" \
      --json results/ablation_criteria.json "${T[@]}"
  [[ -f "$noalign" ]] || $U train-aggregator "$m" --out "$noalign" --images "$AGG_IMAGES" --seed 0 --no-align "${T[@]}"
  [[ -f results/ablation_noalign.json ]] || $U eval "$m" --no-align --criterion entropy \
      --aggregate mean,entropy,attention --aggregator "$noalign" --budget 1,2,4,8 --limit "$SLICE" \
      --json results/ablation_noalign.json "${T[@]}"
  [[ -f results/ablation_all_sites.json ]] || $U eval "$m" --searchable main --criterion entropy \
      --aggregate mean,entropy --budget 1,2,4,8 --limit "$SLICE" --json results/ablation_all_sites.json "${T[@]}"
}

for s in "${STAGES[@]}"; do
  if [[ "$s" == ablation ]]; then ablation_stage; else model_stage "$s"; fi
done
$PY scripts/render_results.py
