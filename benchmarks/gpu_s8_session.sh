#!/usr/bin/env bash
# Session 8's device calls (nvidia-h200-x2). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=lamport: the fused all-reduce's GPU tests (Lamport sentinels, the default now), the collectives
#   bench with both protocols in one call, and maverick-slice FP8 decode at TP2 with each protocol
#   (DGX_EMU_SYMM_PROTOCOL) and TP1 beside them.
# PART=tp: TP2 greedy == TP1 (tests/test_tp_gpu.py), then TP1 / TP2 decode again (alternated), medium bf16.
# PART=programs: the collectives bench at 1-128 tokens for Lamport at 32 and 128 programs per launch and
#   flags at 32 (where Lamport's 128-token loss comes from), and maverick-slice TP2 at 128 programs.
# PART=final: the shipping default (Lamport at 128 programs): the GPU tests of the fused kernel and TP2 == TP1,
#   the collectives (Lamport and flags, 1-128 tokens), maverick-slice TP1 / TP2 twice, the MoE's TP vs EP
#   layouts at 1 / 4 / 16 tokens, medium bf16 TP1 / TP2.
# PART=bench: every collective of bench collectives (graph and eager, Lamport and flags), and the EAGLE-3
#   draft's small GEMVs (gemv_bench.py --shapes draft) for the emulator's draft rows.
# PART=gather: the symm all_gather == NCCL's (now all_gather_into_tensor) test, and both timed at 1-128 tokens.
# PART=check: after the last commits that touch GPU code, the GPU tests, the collectives and TP1 / TP2 once more.
#   PART=lamport|tp|programs|final|bench|gather|check bash benchmarks/gpu_s8_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
maverick() {  # maverick TP PROTOCOL TAG [AB-PREFIX] [ENV]
  TAIL=3 step "maverick-tp$1-$2-$3" 110 DGX_EMU_SYMM_PROTOCOL=$2 ${5:-} $DGX bench decode --model maverick-slice \
      --dtype fp8 --tp $1 --modes graph --iters 150 --out "$OUT/h200x2-${4:-}decode-maverick-slice-fp8-$C-$2-$3-tp$1.json"
}
if [[ "${PART:-lamport}" == lamport ]]; then
  TAIL=8 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_fused_allreduce.py
  TAIL=16 step collectives 170 $DGX bench collectives --tp 2 --protocols lamport,flags --modes graph \
      --out "$OUT/h200x2-collectives-$C.json"
  maverick 2 flags r1 ab-
  maverick 2 lamport r1 ab-
  maverick 1 lamport r1 ""
elif [[ "${PART:-lamport}" == final ]]; then  # the shipping default (Lamport, 128 programs) end to end
  TAIL=8 step tests 300 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_fused_allreduce.py \
      tests/test_tp_gpu.py
  TAIL=16 step collectives 150 $DGX bench collectives --tp 2 --protocols lamport,flags --modes graph \
      --tokens 1,4,16,32,64,128 --out "$OUT/h200x2-collectives.json"
  for round in f1 f2; do
    maverick 1 lamport $round ""
    maverick 2 lamport $round ""
  done
  for moe in tp ep; do
    TAIL=4 step "maverick-tp2-moe-$moe" 110 $DGX bench decode --model maverick-slice --dtype fp8 --tp 2 --moe $moe \
        --modes graph --iters 100 --steps decode,verify,verify16 --out "$OUT/h200x2-ab-decode-maverick-slice-fp8-$C-moe-$moe-steps-tp2.json"
  done
  for tp in 1 2; do
    TAIL=3 step "medium-bf16-tp$tp" 90 $DGX bench decode --model medium --dtype bf16 --tp $tp --modes graph --iters 150 \
        --out "$OUT/h200x2-decode-medium-bf16-$C-tp$tp.json"
  done
elif [[ "${PART:-lamport}" == bench ]]; then  # every collective of the bench, and the draft's small GEMVs
  TAIL=40 step collectives 330 $DGX bench collectives --tp 2 --protocols lamport,flags --modes graph,eager \
      --tokens 1,4,16,32,64,128 --out "$OUT/h200x2-collectives.json"
  TAIL=24 step gemv-draft 150 python benchmarks/gemv_bench.py --shapes draft --dtypes bf16 --ms 1 2 4 \
      --out "$OUT/h200-gemv-draft.json"
elif [[ "${PART:-lamport}" == gather ]]; then  # NCCL's all_gather as one all_gather_into_tensor
  TAIL=6 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf \
      tests/test_fused_allreduce.py::test_gpu_small_all_gather_by_fused_sum_equals_nccl
  TAIL=16 step gather 150 $DGX bench collectives --tp 2 --collectives all_gather --modes graph,eager \
      --tokens 1,4,16,32,64,128 --out "$OUT/h200x2-collectives-all-gather-$C.json"
elif [[ "${PART:-lamport}" == check ]]; then  # the last GPU-touching commits: tests, collectives, TP1 / TP2
  TAIL=8 step tests 280 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_fused_allreduce.py \
      tests/test_tp_gpu.py
  TAIL=16 step collectives 120 $DGX bench collectives --tp 2 --modes graph --tokens 1,4,16,128 \
      --out "$OUT/h200x2-collectives-check-$C.json"
  maverick 1 lamport c1 ""
  maverick 2 lamport c1 ""
elif [[ "${PART:-lamport}" == programs ]]; then
  TAIL=20 step collectives 240 $DGX bench collectives --tp 2 --protocols lamport,lamport@128,flags --modes graph \
      --tokens 1,4,16,32,64,128 --samples 60 --out "$OUT/h200x2-collectives-programs-$C.json"
  maverick 2 lamport p128 ab- DGX_EMU_SYMM_PROGRAMS=128
  maverick 2 lamport r3 ""
else
  TAIL=8 step tests 300 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_tp_gpu.py
  maverick 2 lamport r2 ""
  maverick 1 lamport r2 ""
  for tp in 1 2; do
    TAIL=3 step "medium-bf16-tp$tp" 90 $DGX bench decode --model medium --dtype bf16 --tp $tp --modes graph --iters 150 \
        --out "$OUT/h200x2-decode-medium-bf16-$C-tp$tp.json"
  done
fi
finish
