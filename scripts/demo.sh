#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default job: list the subsampling sites of ResNet-50.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/undiscard sites timm:resnet50 "$@"
