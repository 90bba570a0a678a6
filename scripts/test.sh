#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the fast test suite; extra arguments go to pytest.
# This is exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
