#!/usr/bin/env bash
# One device call (nvidia-h200): FP8 on the tensor cores (model/kernels/fp8_mma.py) against the CUDA-core GEMV.
# The kernel tests on the GPU, the GEMV variants table (MMA tiles among the others), then the medium decode step
# in bf16, in fp8 as shipped, and in fp8 with DGX_EMU_GEMV_FP8 set (default MMA=1), all in one run so the ratios
# compare like with like. Carry .device (raysite.tar.xz, head.tar.gz = `git archive HEAD | gzip`).
# Two calls, each under the 10-minute limit (run on nvidia-h200-x2 so that the two-GPU tests run too):
#   PART=tests bash benchmarks/gpu_fp8_mma_session.sh     # the GPU tests that no lent GPU has run yet
#   FP8_CFG="MMA=1" VARIANTS_S=150 bash benchmarks/gpu_fp8_mma_session.sh
# Its run at 7a5ac81 set linear_small_m.mma_default (60be190, db3640e); results h200-gemv-variants-mma.json and
# h200-decode-*-{ship,mma}-7a5ac81.json. Since then the tensor cores are the default from 2 rows up, so `mma`
# rows force them at one row too.
source benchmarks/device_prelude.sh
if [[ "${PART:-bench}" == tests ]]; then
  for group in "tests/test_kernel_linear_small_m.py tests/test_kernel_pdl.py" \
               "tests/test_virtual_clock_spec.py tests/test_continuous_batching.py tests/test_batch_invariance.py" \
               "tests/test_moe_static_ep.py tests/test_launch_plan.py tests/test_ray_cluster.py"; do
    TAIL=10 step "tests-$(echo $group | md5sum | cut -c1-6)" 170 python -m pytest -q -p no:cacheprovider -o addopts= -rf $group
  done
  finish; exit 0
fi
TAIL=400 step variants $((${VARIANTS_S:-150} + 60)) python benchmarks/gemv_bench.py --variants "${VARIANTS_S:-150}" \
    --out "$OUT/h200-gemv-variants-mma.json"
grep -E "^(dense|experts)|mma|heuristic" "$L/variants.txt" | head -150
for spec in "medium bf16 ship" "medium fp8 ship" "medium fp8 mma" "maverick-slice fp8 ship" "maverick-slice fp8 mma"; do
  set -- $spec
  env_cfg=""; [[ $3 == mma ]] && env_cfg="DGX_EMU_GEMV_FP8=${FP8_CFG:-MMA=1}"
  TAIL=4 step "decode-$1-$2-$3" 80 env $env_cfg $DGX bench decode --model $1 --dtype $2 --modes graph --iters 150 \
      --out "$OUT/h200-decode-$1-$2-$3.json"
done
finish
