#!/usr/bin/env bash
# The GPU checks and timings this repository is waiting for, in one device call (~7 minutes on
# an H200): run from the repository root with LABKIT_CACHE holding smollm2-tokenizer/.
#
#   1. correctness at real shapes of what was committed without a GPU run: the W4A16 GEMV's
#      pairs layout (PTX and float32 paths), the int4 engine with CUDA graphs on and off, and
#      the KV decode kernels after words_f16 changed (docs/PERF.md, 2026-12-05);
#   2. the KV int8/int4 decode against bf16 at B=64, L=2048 (was 88.9 / 77.5 us, 1.39x / 1.60x);
#   3. the W4A16 GEMV's wider tile sweep at M = 1 (GPI 2, maxnreg 96) and decode end to end.
# Each step prints its own table; record the results in docs/PERF.md.
set -u
export LABKIT_CACHE=${LABKIT_CACHE:-$PWD/.labkit_cache}
timeout 240 python -m pytest -q -o addopts="" -m gpu -p no:cacheprovider \
    tests/test_w4a16_gemv.py tests/test_engine_backends.py tests/test_kv_quant_kernels.py 2>&1 | tail -6
timeout 120 python scripts/gpu_kvquant.py --skip-e2e --skip-sweep 2>&1 | tail -14
timeout 300 python scripts/gpu_w4a16_gemv.py --ms 1 --shapes 4 --batches 1 4 2>&1 | grep -v skip | tail -12
