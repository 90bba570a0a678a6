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
mkdir -p runs
agg() { "$PY" -m undiscard train-aggregator zoo/fmnist-resnet-s0.safetensors --out "$AGG" --images 4000 --epochs 10 "$@"; }
if ! agg 2> >(tee runs/study-aggregator.err >&2); then  # an aggregator of an older resnet-s0 is retrained
  grep -q "trained with other settings" runs/study-aggregator.err || exit 1
  agg --fresh
fi
DEFAULT_VARIANT="${DEFAULT_VARIANT:-displacement}"  # the library default's search (docs/results.md)
for name in resnet-s0 mobilenet pvt resnet-offaug resnet-8ep resnet-s1 resnet-s2; do
  out="results/study/$name.json"
  sha=$(sha256sum "zoo/fmnist-$name.safetensors" | cut -c1-64)
  # a finished study of this very checkpoint is kept; a retrained model is studied again
  if [[ -z "${FRESH:-}" && -f "$out" ]] && grep -q '"complete": true' "$out" && grep -q "\"checkpoint_sha256\": \"$sha\"" "$out"; then
    echo "done: $out"; continue
  fi
  extra=()
  [[ "$name" == resnet-s0 ]] && extra=(--ablations --aggregator "$AGG")
  [[ "$name" == resnet-offaug || "$name" == resnet-8ep ]] && extra=(--consistency-images 1000)
  "$PY" -m undiscard.evaluation.study "$name" "zoo/fmnist-$name.safetensors" --out "$out" "${extra[@]}"
done
"$PY" -m undiscard.evaluation.study offset-augment resnet-offaug,resnet-8ep --out results/study/offset_augment.json \
  --variant "$DEFAULT_VARIANT"
"$PY" scripts/render_study.py
