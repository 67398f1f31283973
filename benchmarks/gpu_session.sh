#!/usr/bin/env bash
# Everything that needs GPUs, in one device call: checks first, then timings. Results under $OUT.
# Run from the repo root on a machine with >= 2 GPUs (the lent nvidia-h200-x2), with .device/raysite.tar.xz
# built by ../shared/device/make-ray-bundle.sh and carried along.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; nvidia-smi topo -m >> "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'ray', ray.__version__)" | tee "$OUT/versions.txt"
echo "== GPU tests"; python -m pytest -q -p no:cacheprovider tests/test_gpu_node.py tests/test_fp8_numerics.py tests/test_fp8_sharded.py 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
echo "== FP8 GPU check"; timeout 240 python benchmarks/fp8_gpu_check.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/fp8_gpu.txt"
echo "== decode"; timeout 300 python benchmarks/decode_bench.py --device cuda --comm nccl --worlds 1,2 --moe tp,ep \
    --random-preset medium --dtype bf16 --tokens 64 --repeats 5 --tag h200x2 2>&1 | tail -12 | tee "$OUT/decode.txt"
cp benchmarks/results/decode_h200x2.json "$OUT/" 2>/dev/null
echo done
