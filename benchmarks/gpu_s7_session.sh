#!/usr/bin/env bash
# Session 7's device calls (nvidia-h200-x2). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=tp: maverick-slice FP8 decode at TP1 and TP2 with the L2 prefetch on and off (DGX_EMU_L2_PREFETCH=0),
#   alternated; this also times 3921772's one-pass FP8 pre-pass against e004bb9's numbers.
# PART=medium: the GPU tests of what changed (prefetch, attention), the attention kernel's variants at
#   context 512 (benchmarks/attention_bench.py --variants), medium bf16 / fp8 decode with the prefetch on and off.
#   PART=tp|medium bash benchmarks/gpu_s7_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
bench() {  # bench MODEL DTYPE TP on|off ITERS
  local env=""; [[ $4 == off ]] && env="DGX_EMU_L2_PREFETCH=0"
  TAIL=3 step "decode-$1-$2-tp$3-$4" 110 $env $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph \
      --iters $5 --out "$OUT/h200x2-decode-$1-$2-$C-tp$3-prefetch-$4.json"
}
if [[ "${PART:-tp}" == tp ]]; then
  for tp in 1 2; do
    bench maverick-slice fp8 $tp on 120
    bench maverick-slice fp8 $tp off 120
  done
  bench maverick-slice fp8 1 on 120
else
  TAIL=12 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py \
      tests/test_kernel_pdl.py
  TAIL=40 step attention 150 python benchmarks/attention_bench.py --variants --out "$OUT/h200-attention-variants-$C.json"
  for dt in bf16 fp8; do
    bench medium $dt 1 on 150
    bench medium $dt 1 off 150
  done
fi
finish
