#!/usr/bin/env bash
# One device call for the multi-GPU work (issue 15) on nvidia-h200-x2: checks first, then timings; results under $OUT.
# Run from the repo root with .device/raysite.tar.xz (../shared/device/make-ray-bundle.sh) carried.
# With .device/head.tar.gz (`git archive HEAD | gzip > .device/head.tar.gz`, carried too) it runs that
# committed tree, not the working copy (whose .git on the device may be older than the checkout).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site
if [[ -f .device/head.tar.gz ]]; then
  mkdir -p /tmp/head && tar xzf .device/head.tar.gz -C /tmp/head && cp -r .device /tmp/head/ && cd /tmp/head
  echo "running the archived HEAD: $(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null)"
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
DGX="python -m launch"
STAGE=${STAGE:-all}
if [[ $STAGE == all || $STAGE == tests ]]; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-300} python -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_fused_allreduce.py \
      tests/test_tp_gpu.py tests/test_spec_cuda_graphs.py tests/test_cuda_graphs.py tests/test_gpu_stamps.py \
      tests/test_kernel_fused_norm.py} 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
fi
if [[ $STAGE == all || $STAGE == bench ]]; then
  echo "== collectives, TP2"
  timeout 150 $DGX bench collectives --tp 2 --samples 60 --out "$OUT/h200x2-collectives.json" 2>&1 | tail -30
  echo "== decode steps, TP1 and TP2"
  for tp in 1 2; do
    timeout 100 $DGX bench decode --model medium --dtype bf16 --modes graph --tp $tp \
        --out "$OUT/h200x2-decode-medium-bf16-tp$tp.json" 2>&1 | tail -3
    timeout 120 $DGX bench decode --model maverick-slice --dtype fp8 --modes graph --tp $tp \
        --out "$OUT/h200x2-decode-maverick-slice-fp8-tp$tp.json" 2>&1 | tail -3
  done
  echo "== generate, embedded, bf16"
  for args in "--world-size 1 --draft-len=3" "--world-size 2 --no-spec" "--world-size 2 --draft-len=3"; do
    timeout 90 $DGX generate --device cuda --dtype bf16 $args --prompt "The DGX B200 node is" \
        --max-new-tokens 200 --ignore-eos --json 2>>"$OUT/generate.err" | tail -1 | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$args', 'tok/s', round(d['tokens_per_s'],1), 'AL', d.get('acceptance_length'), 'p50 ms', round(d['step_latency_s']['p50']*1e3,3))" \
        || tail -5 "$OUT/generate.err"
  done
fi
tar czf "$OUT/details.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d generate* pytest_gpu.txt 2>/dev/null) 2>/dev/null \
    && (cd "$OUT" && rm -rf generate* pytest_gpu.txt)
echo done
