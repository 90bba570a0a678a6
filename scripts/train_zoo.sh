#!/usr/bin/env bash
# Train the classification zoo on Fashion-MNIST (recipe: src/undiscard/models/train_classifier.py and
# src/undiscard/models/archs.py). Seeded and resumable: rerun after an interruption and each
# model carries on from its last saved step; finished models are kept. A model of an older
# recipe stays in place, usable, until its retrained file is written over it (--replace).
#   bash scripts/train_zoo.sh              # every model, in the order below
#   bash scripts/train_zoo.sh resnet-s0    # only the named ones
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
COMMON=(--size 64 --batch-size 256 --lr 2e-3 --augment shift --threads "${THREADS:-0}" --replace)
declare -A ARCH=([resnet-s0]=fmnist-resnet [resnet-s1]=fmnist-resnet [resnet-s2]=fmnist-resnet
                 [mobilenet]=fmnist-mobilenet [pvt]=fmnist-pvt [resnet-offaug]=fmnist-resnet
                 [resnet-8ep]=fmnist-resnet)
declare -A EXTRA=([resnet-s0]="--epochs 16 --seed 0" [resnet-s1]="--epochs 16 --seed 1" [resnet-s2]="--epochs 16 --seed 2"
                  [mobilenet]="--epochs 20 --seed 0" [pvt]="--epochs 20 --seed 0"
                  [resnet-offaug]="--epochs 8 --seed 0 --offset-augment 0.5" [resnet-8ep]="--epochs 8 --seed 0")
ORDER=(resnet-s0 mobilenet pvt resnet-s1 resnet-s2 resnet-offaug resnet-8ep)
NAMES=("$@"); [[ ${#NAMES[@]} -gt 0 ]] || NAMES=("${ORDER[@]}")
for name in "${NAMES[@]}"; do
  [[ -n "${ARCH[$name]:-}" ]] || { echo "unknown zoo model $name; known: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  "$PY" -m undiscard train-backbone "zoo:${ARCH[$name]}" --out "zoo/fmnist-$name.safetensors" "${COMMON[@]}" ${EXTRA[$name]}
done
