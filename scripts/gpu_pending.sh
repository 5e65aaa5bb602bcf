#!/usr/bin/env bash
# GPU checks and timings in three device calls (each < 10 minutes on an H100 or H200): run from
# the repository root with LABKIT_CACHE holding smollm2-tokenizer/. All three ran on an H100 on
# 2026-12-05 (docs/PERF.md, "GPU: 2026-12-05 (late morning)"); they stay as the recipe to
# re-measure after a kernel change.
#
#   bash scripts/gpu_pending.sh 1   (~7 minutes)
#     1. correctness at real shapes of what was committed without a GPU run: the W4A16 GEMV's
#        pairs layout (PTX and float32 paths), the int4 engine with CUDA graphs on and off, the
#        KV decode kernels after words_f16 changed (docs/PERF.md, 2026-12-05);
#     2. the KV int8/int4 decode against bf16 at B=64, L=2048 (was 88.9 / 77.5 us, 1.39x / 1.60x);
#     3. the W4A16 GEMV's wider tile sweep at M = 1 (GPI 2, maxnreg 96) and decode end to end.
#   bash scripts/gpu_pending.sh 3   (~5 minutes)
#     5. issue 6's decode and throughput figures again on whatever card is lent (its targets are
#        stated for an H100; the last runs were all on H200s, whose faster copy moves the
#        fixed per-step costs into a larger share of the roofline).
#   bash scripts/gpu_pending.sh 2   (~8 minutes)
#     4. the tensor-core W4A16 kernel in fragment order (kernels/w4a16_frag.py): its GPU tests
#        (bf16 PTX and float32 paths, the engine with gpu_kernel = "frag"), its speed against
#        cuBLAS and today's kernels at M = 1..256 with a tile sweep, and decode end to end.
# Each step prints its own table; record the results in docs/PERF.md.
set -u
export LABKIT_CACHE=${LABKIT_CACHE:-$PWD/.labkit_cache}
part=${1:-1}
if [ "$part" = 1 ]; then
  timeout 240 python -m pytest -q -o addopts="" -m gpu -p no:cacheprovider \
      tests/test_w4a16_gemv.py tests/test_engine_backends.py tests/test_kv_quant_kernels.py 2>&1 | tail -6
  timeout 120 python scripts/gpu_kvquant.py --skip-e2e --skip-sweep 2>&1 | tail -14
  timeout 300 python scripts/gpu_w4a16_gemv.py --ms 1 --shapes 4 --batches 1 4 2>&1 | grep -v skip | tail -12
elif [ "$part" = 3 ]; then
  nvidia-smi --query-gpu=name --format=csv,noheader
  timeout 200 python -m labkit bench decode --load-format dummy --model-shape llama-2-7b \
      --points 1x128 1x256 64x1024 --steps 32 --peers '' 2>&1 | tail -8
  timeout 200 python -m labkit bench throughput --load-format dummy --model-shape smollm2-135m \
      --recipe nanovllm --no-hf --repeats 3 2>&1 | tail -8
else
  timeout 150 python -m pytest -q -o addopts="" -m gpu -p no:cacheprovider tests/test_w4a16_frag.py \
      "tests/test_engine_backends.py::test_int4_engine_frag_kernel_gpu" 2>&1 | tail -6
  timeout 420 python scripts/gpu_w4a16_frag.py --shapes 4 --ms 1 4 16 64 256 --batches 1 4 16 2>&1 \
      | grep -v skip | tail -24
fi
