#!/usr/bin/env bash
# The engine benchmark (issue 4): random-weight timm resnet18 / resnet50 / mobilenetv2_100,
# 224x224, batch 16, CPU; plain vs ours vs the re-run baseline vs the trie floor.
# Writes results/bench_cpu.{json,png} and re-renders the README's benchmark section.
# Takes about 15 minutes on 2 cores; extra arguments go to `undiscard bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/undiscard bench --json results/bench_cpu.json --plot results/bench_cpu.png --readme README.md "$@"
