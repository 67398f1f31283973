#!/usr/bin/env bash
# Session 13's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=probe: what producer-side activation quantization could save, before building it:
#   1. GPU tests of linear_small_m (x_fp8: x quantized by its producer, against the in-kernel quantization);
#   2. the medium weight stream as linear_small_m launches (benchmarks/persistent_probe.py --given-fp8): FP8 as the
#      decode step runs it, then with every GEMV handed its activation already quantized (the upper bound);
#   3. Nsight Compute on one QKV-shaped FP8 GEMV (4096 x 2048), in-kernel quantization vs x_fp8;
#   4. the fast path's GPU tests (not run on a GPU since 7651e37).
#   PART=probe bash benchmarks/gpu_s13_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
R="$OUT/res"; mkdir -p "$R"
DEADLINE=${DEADLINE:-550}  # seconds of this call after which no new step starts (the run's limit is 600)
if [[ "${PART:-probe}" == probe ]]; then
  TAIL=4 step tests-lsm 120 python -m pytest -q -p no:cacheprovider -o addopts= -rf \
      tests/test_kernel_linear_small_m.py -k "'producer or gpu'"
  TAIL=8 step chain 150 "python benchmarks/persistent_probe.py --no-persistent --dtypes fp8,bf16 --given-fp8 \
      --out $R/h200-gemv-chain-medium-given-fp8-$C.json | grep -v Warn"
  cat > /tmp/gemv_once.py <<'PY'
import sys, torch
sys.path.insert(0, '.')
from model.kernels.linear_small_m import linear_small_m
from model.kernels.fp8_mma import prequantize
x = torch.randn(1, 2048, device='cuda', dtype=torch.bfloat16)
w = torch.randn(4096, 2048, device='cuda') / 45
s = w.abs().amax(-1) / 448
w = (w / s[:, None]).to(torch.float8_e4m3fn)
x_fp8 = prequantize(x, None, 'token')
for given in (None, x_fp8):
    for _ in range(3):
        linear_small_m(x, w, weight_scale=s, act_quant='token', x_fp8=given)
torch.cuda.synchronize()
PY
  if (( SECONDS < DEADLINE - 120 )); then
    TAIL=2 step ncu 90 /usr/local/cuda/bin/ncu --kernel-name regex:_gemv_kernel --launch-skip 2 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats -o "$R/gemv" \
        python /tmp/gemv_once.py
    TAIL=150 step ncu-details 30 /usr/local/cuda/bin/ncu -i "$R/gemv.ncu-rep" --page details --print-details all
    rm -f "$R/gemv.ncu-rep"
  fi
  if (( SECONDS < DEADLINE - 100 )); then
    TAIL=6 step tests-fast-path $((DEADLINE - SECONDS)) python -m pytest -q -p no:cacheprovider -o addopts= -rf \
        tests/test_fast_path.py
  fi
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"  # a call brings back at most 8 files
fi
finish
