#!/usr/bin/env bash
# FP8 on one GPU, in one device call: the kernel and GEMM checks, then timings. Results under $OUT.
# Run from the repo root on the lent nvidia-h200 with .device/raysite.tar.xz carried along
# (built by ../shared/device/make-ray-bundle.sh; decode_bench imports Ray).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
echo "== FP8 GPU tests"; timeout 240 python -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_numerics.py \
    tests/test_fp8_sharded.py 2>&1 | tail -15 | tee "$OUT/pytest_fp8_gpu.txt"
echo "== FP8 GPU check"; timeout 300 python benchmarks/fp8_gpu_check.py --out "$OUT" 2>&1 | tail -60 | tee "$OUT/fp8_gpu.txt"
for run in bf16:0 fp8:0 fp8:16; do  # dtype : DGX_EMU_FP8_SMALL_M (16: the Triton decode GEMM)
  dtype=${run%:*}; small=${run#*:}; tag=h200_${dtype}$([ "$small" != 0 ] && echo _triton_gemm)
  echo "== decode $tag"; DGX_EMU_FP8_SMALL_M=$small timeout 150 python benchmarks/decode_bench.py --device cuda \
      --comm nccl --worlds 1 --moe tp --random-preset medium --dtype $dtype --tokens 64 --repeats 5 --tag $tag 2>&1 \
      | tail -6 | tee "$OUT/decode_$tag.txt"
  cp benchmarks/results/decode_$tag.json "$OUT/" 2>/dev/null
done
echo done
