#!/usr/bin/env bash
# Session 6's device calls (nvidia-h200-x2), PART=tests or PART=bench. Carry .device (raysite.tar.xz,
# head.tar.gz). tests: the GPU tests of what changed (folded step stamps, ids written in place by the
# argmax, tuned deep-K FP8 tiles), then what tracing costs (trace_cost_gpu.py). bench: the decode
# benchmarks of medium (bf16, fp8) and maverick-slice (fp8, TP1 and TP2) at this commit.
# profile: kernel traces of maverick-slice's FP8 decode step at TP1 and TP2 (where TP2's time goes).
#   PART=tests|bench|profile bash benchmarks/gpu_s6_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
if [[ "${PART:-tests}" == profile ]]; then  # kernel traces of maverick-slice's FP8 decode step at TP1 and TP2
  TAIL=8 step gpu-gemv 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py -k gpu
  for tp in 1 2; do
    TAIL=30 step "profile-tp$tp" 120 $DGX bench decode --model maverick-slice --dtype fp8 --tp $tp --modes graph \
        --iters 60 --steps decode --profile "$OUT/prof-tp$tp"
    mv "$OUT/prof-tp$tp/decode_step_trace.json" "$OUT/h200x2-maverick-slice-fp8-tp$tp-$C-chrome-trace.json"
  done
elif [[ "${PART:-tests}" == tests ]]; then
  TAIL=25 step tests 300 python -m pytest -q -p no:cacheprovider -o addopts= --durations=6 -rf \
      tests/test_gpu_stamps.py tests/test_graph_trace.py tests/test_kernel_argmax.py tests/test_kernel_embed_norm.py \
      tests/test_launch_plan.py tests/test_cuda_graphs.py tests/test_graph_loop.py
  TAIL=12 step trace-cost 260 python benchmarks/trace_cost_gpu.py --rounds 4 --out "$OUT/h200-trace-cost-$C.json"
else
  for spec in "medium bf16 1" "medium fp8 1" "maverick-slice fp8 1" "maverick-slice fp8 2"; do
    set -- $spec
    TAIL=4 step "decode-$1-$2-tp$3" 90 $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph --iters 150 \
        --out "$OUT/h200x2-decode-$1-$2-$C-tp$3.json"
  done
  TAIL=6 step gpu-stamps 100 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_gpu_stamps.py
  TAIL=6 step gpu-gemv 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py -k gpu
fi
finish
