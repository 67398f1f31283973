#!/usr/bin/env bash
# Session 6's device calls (nvidia-h200-x2), PART=tests or PART=bench. Carry .device (raysite.tar.xz,
# head.tar.gz). tests: the GPU tests of what changed (folded step stamps, ids written in place by the
# argmax, tuned deep-K FP8 tiles), then what tracing costs (trace_cost_gpu.py). bench: the decode
# benchmarks of medium (bf16, fp8) and maverick-slice (fp8, TP1 and TP2) at this commit.
# profile: kernel traces of maverick-slice's FP8 decode step at TP1 and TP2 (where TP2's time goes).
# winner: the several-rank pick's winner kernel measured at TP1 / TP2, world-2 tokens checked.
#   PART=tests|bench|profile|winner bash benchmarks/gpu_s6_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
if [[ "${PART:-tests}" == profile ]]; then  # kernel traces of maverick-slice's FP8 decode step at TP1 and TP2
  TAIL=8 step gpu-gemv 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_linear_small_m.py -k gpu
  for tp in 1 2; do
    TAIL=30 step "profile-tp$tp" 120 $DGX bench decode --model maverick-slice --dtype fp8 --tp $tp --modes graph \
        --iters 60 --steps decode --profile "$OUT/prof-tp$tp"
    mv "$OUT/prof-tp$tp/decode_step_trace.json" "$OUT/h200x2-maverick-slice-fp8-tp$tp-$C-chrome-trace.json"
  done
elif [[ "${PART:-tests}" == winner ]]; then  # the winner kernel: tests, TP1 vs TP2, world 2 tokens = world 1
  TAIL=8 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_argmax.py \
      tests/test_gpu_stamps.py tests/test_launch_plan.py tests/test_graph_trace.py
  for tp in 1 2; do
    TAIL=4 step "decode-tp$tp" 90 $DGX bench decode --model maverick-slice --dtype fp8 --tp $tp --modes graph \
        --iters 150 --out "$OUT/h200x2-decode-maverick-slice-fp8-$C-tp$tp.json"
  done
  for w in 1 2; do
    step "gen-w$w" 90 $DGX generate --device cuda --dtype bf16 --prompt The_DGX_B200_node_is --max-new-tokens 200 \
        --ignore-eos --json --world-size $w --no-spec
  done
  python -c "import json; a,b=[json.loads(open('$L/gen-w%d.txt'%w).read().strip().splitlines()[-1]) for w in (1,2)]; print('world 2 tokens == world 1:', a['token_ids']==b['token_ids'], 'p50 us', round(a['step_latency_s']['p50']*1e6,1), round(b['step_latency_s']['p50']*1e6,1))"
  TAIL=8 step trace-cost-w2 200 python benchmarks/trace_cost_gpu.py --rounds 2 --world-size 2 --tokens 200 \
      --out "$OUT/h200x2-trace-cost-w2-$C.json"
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
