#!/usr/bin/env bash
# Tracing on the lent GPU host, in one device call: what a GPU timestamp costs, the GPU trace
# tests (CUDA-event times, 1 and 2 GPUs), then the tracing overhead on the host's CPU (one core
# per rank) and on the GPUs.
# Run from the repo root on nvidia-h200 (the 2-GPU parts run on nvidia-h200-x2) with .device/raysite.tar.xz carried along.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L > "$OUT/nvidia-smi.txt" 2>&1; lscpu | head -20 >> "$OUT/nvidia-smi.txt"
echo "== GPU timestamp cost"; timeout 120 python benchmarks/gpu_stamp_cost.py 2>&1 | tee "$OUT/gpu_stamp_cost.txt"
echo "== GPU trace tests"; timeout 240 python -m pytest -q -p no:cacheprovider tests/test_trace_gpu.py 2>&1 | tail -15 | tee "$OUT/pytest_trace_gpu.txt"
run() { local name=$1; shift; echo "== $name"; timeout 200 python benchmarks/trace_overhead.py "$@" 2>&1 | grep -v '^round' | tee "$OUT/$name.txt"; }
run cpu_world1 --world 1 --rounds 300 --tag host16cpu
run cpu_world8 --world 8 --rounds 120 --tokens 24 --tag host16cpu
run gpu_world1 --world 1 --rounds 150 --device cuda --tag h200
[ "${WITH_MEDIUM:-0}" = 1 ] && run gpu_world1_medium --world 1 --rounds 50 --device cuda --random-preset medium --tag h200_medium
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then run gpu_world2 --world 2 --rounds 30 --device cuda --tag h200; fi
tar czf "$OUT/results.tgz" benchmarks/results/trace_overhead_*.json benchmarks/results/gpu_stamp_cost_*.json
echo done
