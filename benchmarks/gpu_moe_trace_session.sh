#!/usr/bin/env bash
# One device call (nvidia-h200-x2): kernel traces of the maverick-slice FP8 decode and verify steps as
# shipped (the emulator under-predicts the verify step by ~24%: where does it go?), batch invariance on
# this host's CPU (its GEMMs round by row count: workers/gemm_rows.py), and the GPU tests the last call
# did not reach. Carry .device (raysite.tar.xz, head.tar.gz).
#   bash benchmarks/gpu_moe_trace_session.sh
source benchmarks/device_prelude.sh
for tokens in 4 1; do
  TAIL=2 step "trace-$tokens" 90 python benchmarks/step_trace.py --model maverick-slice --dtype fp8 --tokens $tokens \
      --out "$OUT/h200-maverick-slice-fp8-t$tokens-trace.json"
done
TAIL=4 step cpu-invariance 120 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_batch_invariance.py \
    -k "world2 or all_rows or probe"
TAIL=4 step mma 90 python -m pytest -q -p no:cacheprovider -o addopts= -rf \
    tests/test_kernel_linear_small_m.py::test_gpu_fp8_tensor_core_path_realistic_shapes
TAIL=6 step ray-gpu 170 python -m pytest -q -p no:cacheprovider -o addopts= -rf --durations=3 \
    tests/test_ray_cluster.py::test_gpu_ranks_joining_a_one_host_cluster_keep_the_fused_collectives
finish
