#!/usr/bin/env bash
# Train the two segmentation models on fashion-mnist-seg (recipe: src/undiscard/models/train_segmenter.py).
# Resumable: rerun after an interruption (OUT.resume.safetensors). Existing checkpoints are kept;
# FORCE=1 retrains them. THREADS (default 2) sets torch's CPU threads.
#   scripts/train_seg.sh                  # both
#   scripts/train_seg.sh segformer-tiny   # one
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ARCHS=("$@"); [[ ${#ARCHS[@]} -gt 0 ]] || ARCHS=(deeplabv3-tiny segformer-tiny)
for arch in "${ARCHS[@]}"; do
  case "$arch" in
    deeplabv3-tiny) out=zoo/fmnist_seg_deeplabv3.safetensors ;;
    segformer-tiny) out=zoo/fmnist_seg_segformer.safetensors ;;
    *) echo "train_seg.sh: unknown architecture $arch (deeplabv3-tiny, segformer-tiny)" >&2; exit 2 ;;
  esac
  if [[ -f "$out" && -z "${FORCE:-}" ]]; then echo "exists: $out (FORCE=1 to retrain)"; continue; fi
  "$PY" -m undiscard train-segmenter "$arch" --out "$out" --seed 0 --threads "${THREADS:-2}" ${FORCE:+--fresh}
done
