#!/usr/bin/env bash
# One device call (nvidia-h200-x2) after FP8 went on the tensor cores by default at 2+ rows: the decode
# steps as shipped (medium bf16 / fp8, maverick-slice fp8 at TP1 and TP2), the graph-timed GEMV table the
# emulator's GEMV fits come from (benchmarks/gemv_fit.py), this host CPU's GEMM row invariance, then the
# GPU tests the last calls failed or did not reach. Carry .device (raysite.tar.xz, head.tar.gz).
#   bash benchmarks/gpu_mma_default_session.sh
source benchmarks/device_prelude.sh
for spec in "medium bf16 1" "medium fp8 1" "maverick-slice fp8 1" "maverick-slice fp8 2"; do
  set -- $spec
  TAIL=4 step "decode-$1-$2-tp$3" 90 $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph --iters 150 \
      --out "$OUT/h200-decode-$1-$2-tp$3.json"
done
TAIL=3 step gemv 150 python benchmarks/gemv_bench.py --out "$OUT/h200-gemv.json"
grep -E "^dense +fp8" "$L/gemv.txt" | head -40
TAIL=16 step cpu-rows 30 python benchmarks/cpu_gemm_rows.py --out "$OUT/cpu-gemm-rows-gpu-host.json"
TAIL=14 step tests 200 python -m pytest -q -p no:cacheprovider -o addopts= -rf \
    tests/test_launch_plan.py::test_gpu_step_launches_what_the_plan_launches \
    "tests/test_kernel_linear_small_m.py::test_benchmark_variants_compute_the_reference" \
    tests/test_moe_static_ep.py::test_gpu_static_ep_layer_on_the_kernels_and_in_a_graph \
    tests/test_kernel_pdl.py::test_gpu_same_bits_with_and_without_pdl \
    tests/test_virtual_clock_spec.py::test_one_gpu_spec_clock_equals_the_walk \
    tests/test_batch_invariance.py::test_gpu_batching_stays_close_to_alone \
    tests/test_ray_cluster.py::test_gpu_ranks_joining_a_one_host_cluster_keep_the_fused_collectives \
    tests/test_kernel_linear_small_m.py::test_gpu_fp8_tensor_core_path_realistic_shapes
finish
