#!/usr/bin/env bash
# The checks that need a GPU, as one short run on a lent machine (`run` of the device tool):
# the CUDA tests (bf16, channels_last, --compile, NCCL, the 8-bit finish bit for bit on CUDA)
# and the loaders benchmark with training images/s through each source. About 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
make .venv/.installed
mkdir -p "${OUT:-/tmp}"
.venv/bin/python -m pytest -m gpu -q 2>&1 | tail -20 | tee "${OUT:-/tmp}/gpu-tests.txt"
.venv/bin/python tools/bench.py --only loaders --device cuda --json --rounds 1 \
    --loader-samples 4096 | tee "${OUT:-/tmp}/bench-loaders-cuda.json"
