#!/usr/bin/env bash
# One device call (nvidia-h200): the deep-K FP8 GEMV variants (Maverick's fc2 / o_proj / qkv shapes at
# TP1 and TP2, medium's deepest; gemv_variants.CASES_DEEP_K) and kernel traces of medium's FP8 and BF16
# decode steps (why is the FP8 step only 1% faster?). Carry .device (raysite.tar.xz, head.tar.gz).
#   bash benchmarks/gpu_deepk_session.sh
source benchmarks/device_prelude.sh
TAIL=40 step variants 330 python benchmarks/gemv_bench.py --variants 300 --cases deep-k \
    --out "$OUT/h200-gemv-variants-deep-k.json"
for dtype in fp8 bf16; do
  TAIL=2 step "trace-$dtype" 90 python benchmarks/step_trace.py --model medium --dtype $dtype --tokens 1 \
      --out "$OUT/h200-medium-$dtype-t1-trace.json"
done
finish
