#!/usr/bin/env bash
# One device call for the one-GPU decode work (issue 14): checks first, then timings; results under $OUT.
# Run from the repo root on nvidia-h200 with .device/raysite.tar.xz (../shared/device/make-ray-bundle.sh) carried.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
DGX="python -m launch"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
STAGE=${STAGE:-all}
if [[ $STAGE == all || $STAGE == tests ]]; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-300} python -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_cuda_graphs.py \
      ${KERNEL_TESTS-tests/test_kernel_linear_small_m.py tests/test_kernel_decode_attention.py tests/test_kernel_qkv_rope.py \
      tests/test_kernel_fused_norm.py} 2>&1 | tail -30 | tee "$OUT/pytest_gpu.txt"
fi
if [[ $STAGE == all || $STAGE == bench ]]; then
  echo "== decode steps"
  timeout 90 $DGX bench decode --model medium --dtype bf16 --profile "$OUT/profile-medium-bf16" \
      --out "$OUT/h200-decode-medium-bf16.json" 2>&1 | tail -40
  timeout 60 $DGX bench decode --model embedded --dtype bf16 --modes graph,eager-torch \
      --out "$OUT/h200-decode-embedded-bf16.json" 2>&1 | tail -6
  echo "== generate, embedded, bf16, one GPU"
  for spec in --no-spec --draft-len=3; do
    timeout 60 $DGX generate --device cuda --world-size 1 --dtype bf16 $spec --prompt "The DGX B200 node is" \
        --max-new-tokens 200 --ignore-eos --json 2>"$OUT/generate$spec.err" > "$OUT/generate$spec.json"
    tail -1 "$OUT/generate$spec.json" | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$spec', 'tok/s', d['tokens_per_s'], 'AL', d.get('acceptance_length'), 'p50 ms', d['step_latency_s']['p50']*1e3)" \
        || tail -5 "$OUT/generate$spec.err"
  done
  timeout 70 $DGX bench decode --model maverick-slice --dtype fp8 --modes ${MAV_MODES:-graph} \
      --out "$OUT/h200-decode-maverick-slice-fp8.json" 2>&1 | tail -5
  timeout 50 $DGX bench decode --model medium --dtype fp8 --modes ${FP8_MODES:-graph} \
      --out "$OUT/h200-decode-medium-fp8.json" 2>&1 | tail -5
  [[ ${GEMV:-1} == 1 ]] && { echo "== GEMV kernels"; timeout 90 python benchmarks/gemv_bench.py --out "$OUT/h200-gemv.json" 2>&1 | tail -45; }
fi
# $OUT brings back at most 8 files: fold the profile and the logs into one archive
tar czf "$OUT/details.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d profile-* generate* pytest_gpu.txt 2>/dev/null) 2>/dev/null \
    && (cd "$OUT" && rm -rf profile-* generate* pytest_gpu.txt)
echo done
