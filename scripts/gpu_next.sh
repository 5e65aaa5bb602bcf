#!/usr/bin/env bash
# What the CPU-only sessions left for the next GPU lease, as one device call (< 10 minutes):
#   1. the fused split-KV reduce of kernels/paged_decode.py against the float64 reference at
#      real shapes, and the engine tests (Triton vs torch, CUDA graphs on/off) with it forced on;
#   2. its A/B on the decode step at batch 1 and 4 (issue 6: 81% of the roofline at batch 1,
#      target 85%), twice, in both orders, beside PDL alone (the default now);
#   3. `labkit bench decode` with the reduce on, for PERF.md's table (roofline column).
# Run from the repo root on the device with the tokenizer and tiny models of .labkit_cache
# carried:  export LABKIT_CACHE=$PWD/.labkit_cache; bash scripts/gpu_next.sh
set -u
export LABKIT_CACHE=${LABKIT_CACHE:-$PWD/.labkit_cache}
OUT=${OUT:-.}
T="python -m pytest -q -o addopts= -m gpu -p no:cacheprovider"
AB="python scripts/gpu_fusion_ab.py --shape llama-2-7b --points 1x128 1x256 4x1024"
timeout 170 $AB --combos pdl pdl+reduce --json "$OUT/fusion_ab_reduce_1.json" 2>&1 | tail -4
timeout 100 $AB --combos pdl+reduce pdl --json "$OUT/fusion_ab_reduce_2.json" 2>&1 | tail -4
LABKIT_DECODE_FUSED_REDUCE=1 timeout 150 $T tests/test_engine_backends.py 2>&1 | tail -2
timeout 90 $T tests/test_kernels_triton.py -k decode 2>&1 | tail -2
LABKIT_DECODE_FUSED_REDUCE=1 timeout 80 python -m labkit bench decode --load-format dummy \
  --model-shape llama-2-7b --points 1x128 1x256 64x1024 --steps 32 --peers '' 2>&1 | tail -8
