#!/usr/bin/env bash
# The segmentation cost benchmark: ms/image and ratio to the plain model at B = 1, 4, 10
# (trie engine; rerun engine beside it), median of 3 interleaved repeats in one process, for
#   - the two shipped tiny models (zoo/fmnist_seg_*.safetensors), 96x96 canvases, 16 images, 1 thread;
#   - random-weight torchvision deeplabv3_resnet50, 21 classes, 256x256 noise, batch R50_BATCH (default 4),
#     2 threads, searched at its 3 main sites (64 states; its 1 inner site holds only 4).
# Writes results/seg_bench_cpu.json and re-renders the segmentation section of docs/segmentation.md
# (scripts/render_seg.py). About 2-3 minutes on 2 idle cores; extra arguments go to the module.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
R50_BATCH="${R50_BATCH:-4}"
mkdir -p results
"$PY" -m undiscard.evaluation.seg_bench --json results/seg_bench_cpu.json --r50-batch "$R50_BATCH" "$@"
"$PY" scripts/render_seg.py
