#!/usr/bin/env bash
# Session 12's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=fp8 (run at 818229e's tree: its MMA_ROW and CVT 'mixed' were reverted after): the FP8 GEMV variants of this
#   session, checked and timed in one call:
#   1. GPU tests of the GEMV / MoE pair / persistent-chain kernels (MMA_ROW, CVT 'mixed', the grid barriers);
#   2. the medium weight stream chained through one vector as linear_small_m launches (benchmarks/persistent_probe.py
#      --no-persistent): BF16, then FP8 with each DGX_EMU_GEMV_FP8 override in VARIANTS, against the floor;
#   3. medium FP8 decode steps with those overrides, alternated with the default, and medium BF16.
#   Measured (818229e): both slower (chain FP8 209.0 us default, 218.9 MMA_ROW, 238.7 mixed; medium FP8 decode
#   308.0 / 308.5 default, 343.0 / 342.9 MMA_ROW, 347.1 / 348.2 mixed); reverted.
# PART=prefetch (run at ee8ae24's tree; the switch was dropped after): the next K chunk requested before the current
#   chunk's math (DGX_EMU_GEMV_PREFETCH=1, gemv_math.py)
#   against the default: GPU tests of the GEMV / MoE pair kernels with it on, the chain (probe) and medium BF16 / FP8
#   decode steps alternated, each variant in its own process and Triton cache; then Nsight Compute on one FP8 and
#   one BF16 QKV-shaped GEMV (4096 x 2048) of the default kernel.
#   Measured (ee8ae24): chain FP8 187.9 vs 193.7 us, but the medium FP8 step slower (311.4 / 311.7 vs 307.7 / 308.3),
#   BF16 faster (319.0 / 319.2 vs 322.4 / 322.4), verify the other way round; dropped. ncu: the FP8 GEMV (256 programs
#   of 8 warps, 118 registers a thread) 7.84 us at 22% of DRAM throughput, 23% achieved occupancy, long-scoreboard
#   stalls first; BF16 (1024 programs of 4 warps, 64 registers) 7.87 us for twice the bytes, 45% occupancy.
# PART=tiles: FP8 one-row GEMV tile shapes (DGX_EMU_GEMV_FP8 overrides applied to every FP8 GEMV and MoE pair) in
#   the chain, then the two fastest against the default in medium FP8 decode steps, alternated.
#   Measured (815aa5d): BLOCK_N=8,num_warps=4 fastest (chain 189.3 vs 194.4 us; step 302.1 / 302.2 vs 308.4 / 308.1,
#   but its 4-token verify 523 vs 473 because the override also reached the tensor-core path): made the one-row
#   FP8 heuristic at K <= 4096 (gemv_tiles.ONE_ROW_FP8_MAX_K), verify untouched.
# PART=final: at the stop, the GPU tests of the GEMV / MoE pair / persistent-chain / PDL kernels and the fast path,
#   then medium BF16 / FP8 and maverick-slice FP8 decode (the committed results for that commit).
#   PART=fp8|prefetch|tiles|final bash benchmarks/gpu_s12_session.sh
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
      tests/test_kernel_moe_decode.py tests/test_persistent_chain.py
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
elif [[ "${PART}" == prefetch ]]; then
  TAIL=4 step tests 200 "DGX_EMU_GEMV_PREFETCH=1 TRITON_CACHE_DIR=/tmp/tc-pf python -m pytest -q -p no:cacheprovider \
      -o addopts= -rf tests/test_kernel_linear_small_m.py tests/test_kernel_moe_decode.py"
  for pf in 0 1; do
    TAIL=6 step "chain-pf$pf" 60 "DGX_EMU_GEMV_PREFETCH=$pf TRITON_CACHE_DIR=/tmp/tc-pf$pf python \
        benchmarks/persistent_probe.py --no-persistent --out $R/h200-ab-gemv-chain-medium-pf$pf-$C.json | grep lsm"
  done
  pfbench() {  # pfbench DTYPE PF ROUND
    if (( SECONDS > DEADLINE - 90 )); then echo "== $1 pf$2 $3 skipped (no time left)"; return; fi
    TAIL=3 step "decode-$1-pf$2-$3" 100 "DGX_EMU_GEMV_PREFETCH=$2 TRITON_CACHE_DIR=/tmp/tc-pf$2 $DGX bench decode \
        --model medium --dtype $1 --modes graph --iters 150 --out $R/h200-ab-decode-medium-$1-pf$2-$3-$C-tp1.json"
  }
  for round in r1 r2; do
    for dtype in fp8 bf16; do pfbench $dtype 1 $round; pfbench $dtype 0 $round; done
  done
  cat > /tmp/gemv_once.py <<'PY'
import sys, torch
sys.path.insert(0, '.')
from model.kernels.linear_small_m import linear_small_m
x = torch.randn(1, 2048, device='cuda', dtype=torch.bfloat16)
for dtype in ('fp8', 'bf16'):
    w = torch.randn(4096, 2048, device='cuda') / 45
    kw = {}
    if dtype == 'fp8':
        s = w.abs().amax(-1) / 448
        w, kw = (w / s[:, None]).to(torch.float8_e4m3fn), dict(weight_scale=s, act_quant='token')
    else:
        w = w.to(torch.bfloat16)
    for _ in range(3):
        linear_small_m(x, w, **kw)
torch.cuda.synchronize()
PY
  if (( SECONDS < DEADLINE - 60 )); then
    TAIL=2 step ncu 60 /usr/local/cuda/bin/ncu --kernel-name regex:_gemv_kernel --launch-skip 2 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats -o "$R/gemv" python /tmp/gemv_once.py
    TAIL=120 step ncu-details 30 /usr/local/cuda/bin/ncu -i "$R/gemv.ncu-rep" --page details --print-details all
    rm -f "$R/gemv.ncu-rep"
  fi
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"  # a call brings back at most 8 files
elif [[ "${PART}" == tiles ]]; then
  TILES=${TILES:-"BLOCK_N=8,num_warps=4;BLOCK_N=8,BLOCK_K=2048,num_warps=4;BLOCK_N=4,BLOCK_K=2048,num_warps=4;\
BLOCK_N=4,BLOCK_K=1024,num_warps=4;BLOCK_N=16,BLOCK_K=512,num_warps=4;BLOCK_N=16,BLOCK_K=1024,num_warps=4;\
BLOCK_N=8,BLOCK_K=1024,num_warps=8;BLOCK_N=32,BLOCK_K=512,num_warps=8;BLOCK_N=2,BLOCK_K=2048,num_warps=4;\
PREQUANT=1,BLOCK_N=4,BLOCK_K=2048,num_warps=4;PREQUANT=1,BLOCK_N=8,BLOCK_K=1024,num_warps=4"}
  TAIL=16 step chain 200 "python benchmarks/persistent_probe.py --no-persistent --dtypes fp8 --lsm-variants '$TILES' \
      --out $R/h200-ab-gemv-chain-medium-tiles-$C.json | grep 'fp8 lsm'"
  BEST=$(python - "$R/h200-ab-gemv-chain-medium-tiles-$C.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r.get("name", "").startswith("lsm ") and "median_us" in r]
rows.sort(key=lambda r: r["median_us"])
print(";".join([r["name"][4:] for r in rows if r["name"] != "lsm default"][:2]))
PY
)
  echo "== fastest in the chain: $BEST"
  IFS=';' read -ra BS <<< "$BEST"
  for round in r1 r2; do
    bench fp8 "h200-ab-decode-medium-fp8-tiles-default-$round-$C-tp1"
    for i in "${!BS[@]}"; do bench fp8 "h200-ab-decode-medium-fp8-tiles-best$i-$round-$C-tp1" "${BS[$i]}"; done
  done
  echo "${BEST}" > "$R/best-tiles.txt"
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == final ]]; then
  TAIL=6 step tests 260 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py tests/test_persistent_chain.py tests/test_kernel_pdl.py tests/test_fast_path.py
  for dtype in fp8 bf16; do bench $dtype "h200-decode-medium-$dtype-final-$C-tp1"; done
  for dtype in fp8 bf16; do bench $dtype "h200-ab-decode-medium-$dtype-final-r2-$C-tp1"; done  # a second round
  if (( SECONDS < DEADLINE - 60 )); then
    TAIL=3 step maverick 110 "$DGX bench decode --model maverick-slice --dtype fp8 --modes graph --iters 150 \
        --out $R/h200-decode-maverick-slice-fp8-final-$C-tp1.json"
  fi
fi
finish
