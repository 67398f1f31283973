#!/usr/bin/env bash
# Session 12's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=fp8: the FP8 GEMV variants of this session, checked and timed in one call:
#   1. GPU tests of the GEMV / MoE pair / persistent-chain kernels (MMA_ROW, CVT 'mixed', the grid barriers);
#   2. the medium weight stream chained through one vector as linear_small_m launches (benchmarks/persistent_probe.py
#      --no-persistent): BF16, then FP8 with each DGX_EMU_GEMV_FP8 override in VARIANTS, against the floor;
#   3. medium FP8 decode steps with those overrides, alternated with the default, and medium BF16.
#   PART=fp8 bash benchmarks/gpu_s12_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
R="$OUT/res"; mkdir -p "$R"
DEADLINE=${DEADLINE:-550}  # seconds of this call after which no new step starts (the run's limit is 600)
VARIANTS=${VARIANTS:-"MMA_ROW=1;CVT=mixed;MMA_ROW=1,CVT=mixed"}
bench() {  # bench DTYPE FILE-STEM [OVERRIDES]: one graph-timed medium decode bench, if the call has time left
  if (( SECONDS > DEADLINE - 50 )); then echo "== $2 skipped (no time left)"; return; fi
  TAIL=3 step "$2" 100 "DGX_EMU_GEMV_FP8='${3:-}' $DGX bench decode --model medium --dtype $1 --modes graph \
      --iters 150 --out $R/$2.json"
}
if [[ "${PART:-fp8}" == fp8 ]]; then
  TAIL=6 step tests 170 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py tests/test_kernel_persistent.py
  TAIL=14 step chain 120 "python benchmarks/persistent_probe.py --no-persistent --lsm-variants '$VARIANTS' \
      --out $R/h200-ab-gemv-chain-medium-$C.json | grep -v Warn"
  bench fp8 "h200-ab-decode-medium-fp8-default-r1-$C-tp1"
  IFS=';' read -ra VS <<< "$VARIANTS"
  for v in "${VS[@]}"; do
    tag=$(echo "$v" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | sed 's/-1//g; s/--*/-/g; s/-$//')
    bench fp8 "h200-ab-decode-medium-fp8-$tag-r1-$C-tp1" "$v"
  done
  bench bf16 "h200-ab-decode-medium-bf16-default-r1-$C-tp1"
  bench fp8 "h200-ab-decode-medium-fp8-default-r2-$C-tp1"
  for v in "${VS[@]}"; do
    tag=$(echo "$v" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | sed 's/-1//g; s/--*/-/g; s/-$//')
    bench fp8 "h200-ab-decode-medium-fp8-$tag-r2-$C-tp1" "$v"
  done
fi
finish
