#!/usr/bin/env bash
# Regenerate the zoo study: every number of docs/results.md and of the README's headline
# table. Resumable at every level: finished models, aggregators, state tables and model
# studies are kept (FRESH=1 redoes the studies; delete runs/study to recompute the tables).
#   bash scripts/study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
bash scripts/train_zoo.sh
AGG=zoo/fmnist-resnet-s0.aggregator.safetensors
"$PY" -m undiscard train-aggregator zoo/fmnist-resnet-s0.safetensors --out "$AGG" --images 4000 --epochs 10
DEFAULT_VARIANT="${DEFAULT_VARIANT:-displacement}"  # the library default's search (docs/results.md)
for name in resnet-s0 mobilenet pvt resnet-offaug resnet-s1 resnet-s2; do
  out="results/study/$name.json"
  if [[ -z "${FRESH:-}" && -f "$out" ]] && grep -q '"complete": true' "$out"; then echo "done: $out"; continue; fi
  extra=()
  [[ "$name" == resnet-s0 ]] && extra=(--ablations --aggregator "$AGG")
  [[ "$name" == resnet-offaug ]] && extra=(--consistency-images 1000)
  "$PY" -m undiscard.evaluation.study "$name" "zoo/fmnist-$name.safetensors" --out "$out" "${extra[@]}"
done
"$PY" -m undiscard.evaluation.study offset-augment resnet-offaug,resnet-s0 --out results/study/offset_augment.json \
  --variant "$DEFAULT_VARIANT"
"$PY" scripts/render_study.py
