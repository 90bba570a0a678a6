#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default job: evaluate the shipped Fashion-MNIST
# ResNet-18 with and without recovered activations (first 1000 test images).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
mkdir -p runs
exec .venv/bin/undiscard eval zoo/fmnist_resnet18.safetensors --data fashion-mnist:test --limit 1000 \
  --budget 1,2,4,8 --aggregate mean,entropy,attention --aggregator zoo/fmnist_resnet18.aggregator.safetensors \
  --json runs/demo.json --plot runs/demo.png "$@"
