#!/usr/bin/env bash
# The engine benchmark: random-weight timm resnet18 / resnet50 / mobilenetv2_100,
# 224x224, batch 16 and batch 1, CPU; plain vs ours (trie, segments) vs the re-run baseline vs the trie floor,
# channels_last / torch.compile for each, peak RSS.
# Writes results/bench_cpu.{json,png} and re-renders the benchmark section of docs/benchmarks.md
# (without measuring: .venv/bin/undiscard bench --from-json results/bench_cpu.json --readme docs/benchmarks.md).
# Takes about 20 minutes on 2 cores; extra arguments go to `undiscard bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/undiscard bench --json results/bench_cpu.json --plot results/bench_cpu.png --readme docs/benchmarks.md "$@"
