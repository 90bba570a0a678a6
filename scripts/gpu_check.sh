#!/usr/bin/env bash
# The device checks, for a machine with a CUDA GPU: the tests that run on CUDA where it is
# present (devices, autocast float16/bfloat16, engines, eval --device cuda), then the engine
# benchmark on the GPU (results/bench_gpu.{json,png} and the GPU section of docs/benchmarks.md).
# About 10 minutes on one GPU; extra arguments go to `undiscard bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device (a CPU wheel, or no GPU)')"
.venv/bin/python -m pytest -q -m "not slow" tests/method/test_precision.py tests/run/test_segments.py \
    "tests/evaluation/test_eval_timm_flags.py::test_device_cuda_runs_there_or_is_a_clear_error"
# on CUDA the bench re-renders the <!-- bench-gpu:start/end --> section of docs/benchmarks.md
.venv/bin/undiscard bench --device cuda --repeats 5 --json results/bench_gpu.json --plot results/bench_gpu.png \
    --readme docs/benchmarks.md "$@"
