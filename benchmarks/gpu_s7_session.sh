#!/usr/bin/env bash
# Session 7's device calls (nvidia-h200-x2). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=tp: the GPU tests of the fused RoPE attention and the symm gather, then maverick-slice FP8 decode at TP1
#   and TP2 with the attention's L2 prefetch on and off (DGX_EMU_L2_PREFETCH=0), and medium bf16 / fp8.
# PART=medium: the GPU tests of what changed (prefetch, attention), the attention kernel's variants at
#   context 512 (benchmarks/attention_bench.py --variants), medium bf16 / fp8 decode with the prefetch on and off.
# PART=one: the same on one H200, TP1 only. PART=schemes: FP8 per-channel vs per-tensor (static) scales, medium
#   and maverick-slice, medium bf16 beside them, and a kernel trace of medium's per-tensor FP8 step.
# PART=all: on 2 H200s, maverick-slice TP1 / TP2 in both FP8 schemes, medium, the tests of this session's changes.
# PART=embed: on 2 H200s, TP2 with the embedding replicated vs split (alternated), TP1 beside.
#   PART=tp|one|schemes|all|embed|medium bash benchmarks/gpu_s7_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
bench() {  # bench MODEL DTYPE TP on|off ITERS
  local env=""; [[ $4 == off ]] && env="DGX_EMU_L2_PREFETCH=0"
  TAIL=3 step "decode-$1-$2-tp$3-$4" 110 $env $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph \
      --iters $5 --out "$OUT/${MACHINE:-h200x2}-decode-$1-$2-$C-tp$3-prefetch-$4.json"
}
if [[ "${PART:-tp}" == tp ]]; then
  TAIL=6 step tests 170 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py \
      -k rope_fused tests/test_fused_allreduce.py::test_gpu_small_all_gather_by_fused_sum_equals_nccl
  for tp in 1 2; do
    bench maverick-slice fp8 $tp on 120
  done
  for tp in 1 2; do
    bench maverick-slice fp8 $tp off 120
  done
  bench medium bf16 1 on 150
  bench medium fp8 1 on 150
elif [[ "${PART:-tp}" == all ]]; then  # on 2 H200s: TP1 / TP2 at HEAD in both FP8 schemes, medium, the tests
  TAIL=6 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf ${TESTS:-tests/test_kernel_moe_decode.py \
      tests/test_fused_allreduce.py::test_gpu_small_all_gather_by_fused_sum_equals_nccl tests/test_tp_gpu.py}
  for scheme in channel per-tensor; do
    for tp in 1 2; do
      TAIL=3 step "maverick-$scheme-tp$tp" 110 $DGX bench decode --model maverick-slice --dtype fp8 --fp8-scheme $scheme \
          --tp $tp --modes graph --iters 150 --out "$OUT/h200x2-decode-maverick-slice-fp8-$scheme-$C-tp$tp.json"
    done
  done
  for spec in "medium bf16 channel" "medium fp8 channel" "medium fp8 per-tensor"; do
    set -- $spec
    TAIL=3 step "$1-$2-$3" 90 $DGX bench decode --model $1 --dtype $2 $([[ $2 == fp8 ]] && echo --fp8-scheme $3) \
        --modes graph --iters 150 --out "$OUT/h200x2-decode-$1-$2-$3-$C-tp1.json"
  done
  if [[ -z "${NO_PROFILE:-}" ]]; then
    TAIL=3 step profile 120 $DGX bench decode --model medium --dtype fp8 --fp8-scheme per-tensor --modes graph \
        --iters 60 --steps decode --profile "$OUT/prof"
    mv "$OUT/prof/decode_step_trace.json" "$OUT/h200-medium-fp8-per-tensor-$C-chrome-trace.json"
  fi
  rm -rf "$OUT/prof"
elif [[ "${PART:-tp}" == embed ]]; then  # 2 H200s: TP2 with the embedding replicated vs split, TP1 beside
  TAIL=6 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_tp_gpu.py \
      tests/test_graph_trace.py
  TAIL=3 step maverick-tp1 110 $DGX bench decode --model maverick-slice --dtype fp8 --tp 1 --modes graph --iters 150 \
      --out "$OUT/h200x2-decode-maverick-slice-fp8-$C-tp1.json"
  for round in 1 2; do
    for rep in split replicated; do
      flag=""; [[ $rep == replicated ]] && flag="--replicate-embedding"
      TAIL=3 step "maverick-tp2-$rep-r$round" 110 $DGX bench decode --model maverick-slice --dtype fp8 --tp 2 $flag \
          --modes graph --iters 150 --out "$OUT/h200x2-decode-maverick-slice-fp8-$rep-embedding-$C-r$round-tp2.json"
    done
  done
elif [[ "${PART:-tp}" == schemes ]]; then  # FP8 per-channel (dynamic) vs per-tensor (static) scales, one H200
  TAIL=6 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_moe_decode.py \
      tests/test_fast_path.py
  for round in 1 2; do
    for spec in "medium bf16 channel" "medium fp8 channel" "medium fp8 per-tensor"; do
      set -- $spec
      TAIL=3 step "r$round-$1-$2-$3" 90 $DGX bench decode --model $1 --dtype $2 $([[ $2 == fp8 ]] && echo --fp8-scheme $3) --modes graph \
          --iters 150 --out "$OUT/h200-decode-$1-$2-$3-$C-r$round.json"
    done
  done
  for scheme in channel per-tensor; do
    TAIL=3 step "maverick-$scheme" 110 $DGX bench decode --model maverick-slice --dtype fp8 --fp8-scheme $scheme \
        --modes graph --iters 120 --out "$OUT/h200-decode-maverick-slice-fp8-$scheme-$C.json"
  done
  TAIL=3 step profile 120 $DGX bench decode --model medium --dtype fp8 --fp8-scheme per-tensor --modes graph \
      --iters 60 --steps decode --profile "$OUT/prof"
  mv "$OUT/prof/decode_step_trace.json" "$OUT/h200-medium-fp8-per-tensor-$C-chrome-trace.json"
elif [[ "${PART:-tp}" == one ]]; then  # what one H200 can measure of PART=tp (no TP2)
  TAIL=6 step tests 170 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py \
      -k rope_fused
  bench maverick-slice fp8 1 on 120
  bench maverick-slice fp8 1 off 120
  bench medium bf16 1 on 150
  bench medium fp8 1 on 150
  bench medium bf16 1 off 150
  bench medium fp8 1 off 150
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
