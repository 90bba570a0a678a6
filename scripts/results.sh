#!/usr/bin/env bash
# Regenerate every number in the README's results section, then the section itself.
# Each step is skipped when its output exists (delete results/*.json to redo one) and
# resumes from its partial file when interrupted. CPU: about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
U="$PY -m undiscard"
ABL="${ABL:-resnet18}"          # the model of the ablation tables
SLICE="${SLICE:-2000}"          # ablations and single states: the first SLICE test images
mkdir -p results
for arch in resnet18 mobilenetv2_100 pvt_v2_b0; do
  m="zoo/fmnist_${arch}.safetensors"
  agg="zoo/fmnist_${arch}.aggregator.safetensors"
  [[ -f "$agg" ]] || $U train-aggregator "$m" --out "$agg" --images 3000 --seed 0
  [[ -f "results/${arch}.json" ]] || $U eval "$m" --criterion entropy --aggregate mean,entropy,attention \
      --aggregator "$agg" --budget 1,2,4,8,16 --json "results/${arch}.json" --plot "results/${arch}.png"
  [[ -f "results/${arch}_single.json" ]] || $U eval "$m" --budget 1 --aggregate mean --single-states \
      --limit "$SLICE" --json "results/${arch}_single.json"
done
m="zoo/fmnist_${ABL}.safetensors"
agg="zoo/fmnist_${ABL}.aggregator.safetensors"
noalign="runs/fmnist_${ABL}.aggregator-noalign.safetensors"
[[ -f "results/ablation_criteria.json" ]] || $U eval "$m" --criterion random,displacement,entropy,learned \
    --aggregate mean,entropy,attention --aggregator "$agg" --budget 1,2,4,8,16 --limit "$SLICE" \
    --json results/ablation_criteria.json
[[ -f "$noalign" ]] || $U train-aggregator "$m" --out "$noalign" --images 3000 --seed 0 --no-align
[[ -f "results/ablation_noalign.json" ]] || $U eval "$m" --no-align --criterion entropy \
    --aggregate mean,entropy,attention --aggregator "$noalign" --budget 1,2,4,8,16 --limit "$SLICE" \
    --json results/ablation_noalign.json
[[ -f "results/ablation_all_sites.json" ]] || $U eval "$m" --searchable main --criterion entropy \
    --aggregate mean,entropy --budget 1,2,4,8,16 --limit "$SLICE" --json results/ablation_all_sites.json
$PY scripts/render_results.py
