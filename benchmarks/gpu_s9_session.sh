#!/usr/bin/env bash
# Session 9's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=kernels: the FP8 tensor-core GEMV with x quantized inside the dot kernel (one launch at one row):
#   its GPU tests, every one-row GEMV variant (gemv_bench.py --variants --cases one-row: CUDA cores vs
#   tensor cores, BF16 beside), then the medium decode step with FP8 on the CUDA cores (the default so far)
#   and on the tensor cores (DGX_EMU_GEMV_FP8=MMA=1), BF16 between them, and a kernel trace of the latter.
# PART=prefetch (at d98c1e7; the prefetch was removed after it measured slower): the attention kernel's L2 prefetch of the layer's next weights (DGX_EMU_L2_PREFETCH_MB): its GPU
#   tests, then medium FP8 / BF16 and maverick-slice FP8 decode at budgets 0 (off), 16 and 32 MB, alternated,
#   and a kernel trace of medium FP8 with the default budget.
# PART=final (nvidia-h200-x2; also carry .device/base_moe_decode.py, `git show cc9a0b8:model/kernels/moe_decode.py`,
#   the base tree being HEAD with that file, since HEAD changed no other file the benches run): the GPU tests of the
#   fused all-reduce (after the symm_layout move), the MoE kernels and the fast path at HEAD; medium FP8 / BF16 and
#   maverick-slice FP8 decode at HEAD (the FC2 pair's routed chunk loaded early) and at cc9a0b8, alternated; and
#   maverick-slice FP8 at TP1 and TP2 at HEAD.
# PART=bf16: one-row BF16 GEMV tiles at K = 2048 (gemv_bench.py --variants --cases bf16: medium's linears and LM head).
# PART=bf16rows: after one-row BF16 GEMVs took 2-4 weight rows a program (and the tuned shapes): the GEMV / MoE /
#   fast-path GPU tests, then medium BF16 / FP8 and embedded BF16 decode with the new tiles and with the old ones
#   (DGX_EMU_GEMV_BF16=BLOCK_N=1,BLOCK_K=1024, what every one-row BF16 GEMV ran before), alternated, and the
#   BF16 GEMV table (gemv_bench.py --dtypes bf16) for the emulator's BF16 line.
#   PART=kernels|prefetch|final|bf16|bf16rows bash benchmarks/gpu_s9_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
R="$OUT/res"; mkdir -p "$R"
medium() {  # medium DTYPE TAG [ENV] [EXTRA ARGS]
  TAIL=3 step "medium-$1-$2" 100 ${3:-} $DGX bench decode --model medium --dtype $1 --modes graph --iters 150 \
      --out "$R/h200-ab-decode-medium-$1-$2-$C-tp1.json" ${4:-}
}
if [[ "${PART:-kernels}" == kernels ]]; then
  TAIL=8 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      -k "tensor_core or gpu"
  TAIL=60 step variants 260 python benchmarks/gemv_bench.py --variants 200 --cases one-row \
      --out "$R/h200-gemv-one-row-$C.json"
  medium fp8 gemv
  medium fp8 mma DGX_EMU_GEMV_FP8=MMA=1
  medium bf16 ref
  medium fp8 mma-r2 DGX_EMU_GEMV_FP8=MMA=1 "--profile $R/profile-mma"
elif [[ "${PART:-kernels}" == prefetch ]]; then
  TAIL=8 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_l2_prefetch.py \
      tests/test_fast_path.py tests/test_kernel_pdl.py
  for mb in 0 16 32; do
    medium fp8 "l2-$mb" DGX_EMU_L2_PREFETCH_MB=$mb
    medium bf16 "l2-$mb" DGX_EMU_L2_PREFETCH_MB=$mb
  done
  for mb in 0 24; do
    TAIL=3 step "maverick-l2-$mb" 120 DGX_EMU_L2_PREFETCH_MB=$mb $DGX bench decode --model maverick-slice --dtype fp8 \
        --modes graph --iters 150 --out "$R/h200-ab-decode-maverick-slice-fp8-l2-$mb-$C-tp1.json"
  done
  medium fp8 l2-24-trace "" "--profile $R/profile-fp8"
elif [[ "${PART:-kernels}" == final ]]; then
  rm -rf /tmp/base && cp -r "$PWD" /tmp/base && cp .device/base_moe_decode.py /tmp/base/model/kernels/moe_decode.py
  TAIL=8 step tests 240 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_fused_allreduce.py \
      tests/test_kernel_moe_decode.py tests/test_fast_path.py
  ab() {  # ab MODEL DTYPE ROUND: the same bench at HEAD, then at the base commit
    TAIL=3 step "$1-$2-head-$3" 100 $DGX bench decode --model $1 --dtype $2 --modes graph --iters 150 \
        --out "$R/h200x2-decode-$1-$2-$3-$C-tp1.json"
    TAIL=3 step "$1-$2-base-$3" 100 "cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base $DGX bench decode --model $1 \
        --dtype $2 --modes graph --iters 150 --out $R/h200x2-ab-decode-$1-$2-base-$3-cc9a0b8-tp1.json"
  }
  ab medium fp8 r1
  ab medium bf16 r1
  ab maverick-slice fp8 r1
  ab medium fp8 r2
  TAIL=3 step maverick-tp2 120 $DGX bench decode --model maverick-slice --dtype fp8 --tp 2 --modes graph --iters 150 \
      --out "$R/h200x2-decode-maverick-slice-fp8-f9-$C-tp2.json"
elif [[ "${PART:-kernels}" == bf16 ]]; then
  TAIL=70 step variants 240 python benchmarks/gemv_bench.py --variants 200 --cases bf16 \
      --out "$R/h200-gemv-bf16-$C.json"
elif [[ "${PART:-kernels}" == bf16rows ]]; then
  TAIL=8 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py tests/test_fast_path.py
  OLD="DGX_EMU_GEMV_BF16=BLOCK_N=1,BLOCK_K=1024"
  for round in r1 r2; do
    medium bf16 "rows-$round" ""
    medium bf16 "one-row-$round" "$OLD"
    medium fp8 "rows-$round" ""
    medium fp8 "one-row-$round" "$OLD"
  done
  for tiles in rows one-row; do
    env=""; [[ $tiles == one-row ]] && env=$OLD
    TAIL=3 step "embedded-$tiles" 100 $env $DGX bench decode --model embedded --dtype bf16 --modes graph --iters 150 \
        --out "$R/h200-ab-decode-embedded-bf16-$tiles-$C-tp1.json"
  done
  TAIL=30 step gemv-bf16 150 python benchmarks/gemv_bench.py --dtypes bf16 --out "$R/h200-gemv-bf16-rows-$C.json"
fi
tar czf "$OUT/results.tar.gz" -C "$OUT" res && rm -rf "$R"
finish
