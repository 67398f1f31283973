#!/usr/bin/env bash
# Session 10's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=early: the GEMVs' two early weight chunks (EARLY = 2, the default: a dense GEMV loads the first two K
#   chunks of its tile before its PDL wait, not one): the GPU tests of the GEMV / MoE / PDL kernels and the fast
#   path, then medium BF16 / FP8 decode with EARLY = 2 and with EARLY = 1 (DGX_EMU_GEMV_{BF16,FP8}=EARLY=1, what
#   every GEMV did before), alternated, as long as the call's time lasts. Measured slower (f142e91: bf16 344.4 vs
#   323.3 us, fp8 318.9 vs 309.4) and reverted; the run needs f142e91's tree (`git archive f142e91`).
# PART=final: at the revert (164f475), the GPU tests of the GEMV / MoE kernels and the fast path, then medium
#   BF16 / FP8 decode (the committed results for that commit).
#   PART=early|final bash benchmarks/gpu_s10_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
R="$OUT/res"; mkdir -p "$R"
DEADLINE=${DEADLINE:-540}  # seconds of this call after which no new step starts (the run's limit is 600)
bench() {  # bench MODEL DTYPE FILE-STEM [ENV]: one graph-timed decode bench, if the call has time left
  if (( SECONDS > DEADLINE - 45 )); then echo "== $3 skipped (no time left)"; return; fi
  TAIL=3 step "$3" 100 ${4:-} $DGX bench decode --model $1 --dtype $2 --modes graph --iters 150 --out "$R/$3.json"
}
if [[ "${PART:-early}" == early ]]; then
  ONE="DGX_EMU_GEMV_BF16=EARLY=1 DGX_EMU_GEMV_FP8=EARLY=1"
  TAIL=8 step tests 220 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py tests/test_kernel_pdl.py tests/test_fast_path.py
  for round in r1 r2 r3; do
    for dtype in bf16 fp8; do
      bench medium $dtype "h200-decode-medium-$dtype-early-$round-$C-tp1"
      bench medium $dtype "h200-ab-decode-medium-$dtype-one-chunk-$round-$C-tp1" "$ONE"
    done
  done
elif [[ "${PART:-early}" == final ]]; then
  TAIL=8 step tests 330 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py tests/test_fast_path.py
  for dtype in bf16 fp8; do bench medium $dtype "h200-decode-medium-$dtype-final-$C-tp1"; done
fi
tar czf "$OUT/results.tar.gz" -C "$OUT" res && rm -rf "$R"
finish
