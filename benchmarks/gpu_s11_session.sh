#!/usr/bin/env bash
# Session 11's device calls (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz, base.tar.gz).
# PART=attn: the attention kernel's new tokens from registers and one-pass merge (HEAD) against the tree before it
#   (.device/base.tar.gz: `git archive 919d76a model/kernels/decode_attention.py model/kernels/qkv_rope.py`, laid
#   over a copy of HEAD's tree): the GPU tests of the attention / RoPE / PDL kernels at HEAD, then
#   the fused attention kernel alone (attention_bench.py --variants, HEAD's script run in both trees: default plan,
#   merge unroll 16) and medium BF16 / FP8 and maverick-slice FP8 decode, HEAD and base alternated, as long as the
#   call's time lasts.
#   Measured (67a5a9c): the kernel alone slower (medium T = 1: 8.10 vs 6.66 us) and its T > 1 form failed to compile
#   on sm90; reverted in cc5da12.
# PART=merge: the same A/B for the one-pass online merge of the splits alone (HEAD) against 919d76a's two passes:
#   the GPU tests of the attention kernel, the kernel alone, medium BF16 / FP8 decode alternated. No gain (kernel
#   and step within noise); reverted. Run it at f71213b's tree (`git archive f71213b`).
# PART=profile: Nsight Compute (ncu, present on the lent H200) on one fused attention launch of medium at context 512,
#   T = 1 (attention_bench's inputs): the speed-of-light, occupancy and warp-state sections, and the per-SASS-
#   instruction stall samples (profiles/h200-attention-medium-t1-ncu-sass-<commit>.csv). Note ncu flushes caches and
#   serializes launches (no PDL overlap), so the kernel's 11.5 us there is not its in-graph time (6.7 us).
# PART=final: at the stop (no base tarball), the GPU tests of the attention / RoPE / PDL kernels and the fast path,
#   then medium BF16 / FP8 decode (the committed results for that commit).
#   PART=attn|merge|profile|final bash benchmarks/gpu_s11_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
if [[ -f .device/base.tar.gz ]]; then  # the A/B parts: HEAD's tree but the two kernel files of the base
  B=$(zcat .device/base.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
  rm -rf /tmp/base && cp -r /tmp/head /tmp/base && tar xzf .device/base.tar.gz -C /tmp/base
fi
R="$OUT/res"; mkdir -p "$R"
DEADLINE=${DEADLINE:-540}  # seconds of this call after which no new step starts (the run's limit is 600)
bench() {  # bench TREE MODEL DTYPE FILE-STEM: one graph-timed decode bench in TREE, if the call has time left
  if (( SECONDS > DEADLINE - 45 )); then echo "== $4 skipped (no time left)"; return; fi
  TAIL=3 step "$4" 100 "cd $1 && PYTHONPATH=/tmp/site:$1 $DGX bench decode --model $2 --dtype $3 --modes graph \
      --iters 150 --out $R/$4.json"
}
if [[ "${PART:-attn}" == attn ]]; then
  TAIL=8 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py \
      tests/test_kernel_qkv_rope.py tests/test_kernel_pdl.py
  for tree in /tmp/head /tmp/base; do
    tag=$([[ $tree == /tmp/head ]] && echo "regs-$C" || echo "base-$B")
    TAIL=12 step "attn-$tag" 90 "cd $tree && PYTHONPATH=/tmp/site:$tree python benchmarks/attention_bench.py --variants \
        --shapes medium,maverick-tp1 --tokens 1,4 --only 'merge unroll 16' --out $R/h200-ab-attention-$tag.json"
  done
  for round in r1 r2; do
    for dtype in bf16 fp8; do
      bench /tmp/head medium $dtype "h200-ab-decode-medium-$dtype-regs-$round-$C-tp1"
      bench /tmp/base medium $dtype "h200-ab-decode-medium-$dtype-base-$round-$B-tp1"
    done
  done
  bench /tmp/head maverick-slice fp8 "h200-ab-decode-maverick-slice-fp8-regs-$C-tp1"
  bench /tmp/base maverick-slice fp8 "h200-ab-decode-maverick-slice-fp8-base-$B-tp1"
elif [[ "${PART:-attn}" == profile ]]; then
  NCU=/usr/local/cuda/bin/ncu
  cat > /tmp/attn_once.py <<'PY'
import sys, torch
sys.path.insert(0, '.')
from benchmarks.attention_bench import cases, run
inputs = cases('medium', 512, 1)
for i in range(24):
    run(*inputs[i % 16], 'medium', None, None)
torch.cuda.synchronize()
PY
  TAIL=4 step ncu 240 $NCU --kernel-name regex:_split_kernel --launch-skip 12 --launch-count 1 --set full \
      --import-source yes -o "$R/attn" python /tmp/attn_once.py
  TAIL=80 step ncu-details 60 $NCU -i "$R/attn.ncu-rep" --page details --section SpeedOfLight --section Occupancy \
      --section SchedulerStats --section WarpStateStats --print-details all
  $NCU -i "$R/attn.ncu-rep" --page source --csv --print-source sass > "$R/h200-attention-medium-t1-ncu-sass-$C.csv"
elif [[ "${PART:-attn}" == final ]]; then
  TAIL=8 step tests 330 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py \
      tests/test_kernel_qkv_rope.py tests/test_kernel_pdl.py tests/test_fast_path.py
  for dtype in bf16 fp8; do bench /tmp/head medium $dtype "h200-decode-medium-$dtype-final-$C-tp1"; done
elif [[ "${PART:-attn}" == merge ]]; then
  TAIL=8 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_decode_attention.py
  for tree in /tmp/head /tmp/base; do
    tag=$([[ $tree == /tmp/head ]] && echo "merge-$C" || echo "base-c2-$B")
    TAIL=12 step "attn-$tag" 90 "cd $tree && PYTHONPATH=/tmp/site:$tree python benchmarks/attention_bench.py --variants \
        --shapes medium,maverick-tp1 --tokens 1,4 --only 'merge unroll 2' --out $R/h200-ab-attention-$tag.json"
  done
  for round in r1 r2 r3; do
    for dtype in bf16 fp8; do
      bench /tmp/head medium $dtype "h200-ab-decode-medium-$dtype-merge-$round-$C-tp1"
      bench /tmp/base medium $dtype "h200-ab-decode-medium-$dtype-base-c2-$round-$B-tp1"
    done
  done
fi
tar czf "$OUT/results.tar.gz" -C "$OUT" res && rm -rf "$R"
finish
