#!/usr/bin/env bash
# Train the model zoo on Fashion-MNIST (the recipe is in src/undiscard/zoo.py).
# Resumable: rerun after an interruption. EPOCHS=1 is the CPU recipe the shipped
# checkpoints were trained with; on a GPU use e.g. EPOCHS=10.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-1}"
PY=.venv/bin/python
ARCHS=("$@"); [[ ${#ARCHS[@]} -gt 0 ]] || ARCHS=(resnet18 mobilenetv2_100 pvt_v2_b0)
for arch in "${ARCHS[@]}"; do
  out="zoo/fmnist_${arch}.safetensors"
  if [[ -f "$out" && -z "${FORCE:-}" ]]; then echo "exists: $out (FORCE=1 to retrain)"; continue; fi
  "$PY" -m undiscard train-backbone "timm:$arch" --out "$out" --epochs "$EPOCHS" --seed 0 --threads "${THREADS:-0}" ${FORCE:+--fresh}
done
