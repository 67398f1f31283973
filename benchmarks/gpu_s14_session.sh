#!/usr/bin/env bash
# Session 14's device call (one H200, nvidia-h200). Carry .device (raysite.tar.xz, head.tar.gz).
# PART=check: the final tree on a GPU: the kernels' and the fast path's GPU tests (norm, GEMV, MoE pair with its
#   split sum, CUDA-graph replay = eager for 128 tokens), then medium BF16 / FP8 and maverick-slice FP8 decode in
#   one call (so the FP8 / BF16 ratio is of one run), and a kernel trace of the medium FP8 step
#   (benchmarks/step_trace.py, for kernel_fit.py --compare).
#   Measured (5934250): 89 passed, 2 skipped; medium bf16 323.3 us, fp8 297.4 (0.920x), maverick-slice fp8 955.6.
# PART=gemv: the decode GEMV table of the shipping kernels (benchmarks/gemv_bench.py, BF16 and FP8 at 1 / 4 / 16 rows,
#   graph-timed back to back under PDL), for the emulator's GEMV fits (benchmarks/gemv_fit.py) and the FP8 bandwidths.
#   Measured (9bade8a): h200-gemv-9bade8a.json; its one-row FP8 fit (2.22 us, 0.74) is the node files' fp8_m1 since.
# PART=closing: the embedded model at the final tree: its graph-timed decode bench, and `generate` in bf16 plain and
#   with the shipped EAGLE-3 draft (chain of 3), 300 tokens each (tokens/s, acceptance, the same tokens).
#   Measured (0d9ca1f): embedded decode graph step 60.4 us; generate plain 11,459 tokens/s (step p50 83.7 us; 13,595 and
#   69.5 us at 3c3e2c0 on another machine), EAGLE-3 chain 3 13,137 tokens/s, acceptance 4.0, the same tokens.
# PART=hostab: generate plain of the embedded model at 3c3e2c0 and at this tree, alternated twice on one machine: is the
#   per-token host time of the graph path the same? 3c3e2c0 comes as .device/old.tar.gz, without its results and
#   assets (the carry limit; the assets are the same): git archive 3c3e2c0 -- . ':!benchmarks/results' ':!model/assets'
#   Measured (f60490d): 3c3e2c0 14,839 / 14,906 tokens/s, this tree 14,826 / 14,822, step p50 65.6 us in all four: the
#   same. (PART=closing right after on the same machine: plain 12,197, chain 3 14,920: one run each is noise.)
# PART=genab: generate of the embedded model plain and with the EAGLE-3 draft (chain of 3) alternated, three rounds.
#   Measured (62c152c): plain 14,838 / 14,639 / 14,785 tokens/s (p50 65.6 us), chain 3 15,794 / 15,393 / 15,557 (p50
#   248-254 us, acceptance 4.0), the same tokens in all six.
# PART=static: the medium weight stream (benchmarks/persistent_probe.py) as the FP8 GEMVs run it with dynamic
#   per-token scales, with a static per-tensor scale (no amax pass), and handed e4m3 activations (the bound of
#   producer-side quantization); BF16 beside: would producers that quantize with static scales pay?
#   Measured (dc35730): dynamic per-token 188.4 us (1.83x floor), a static scale 174.9 (1.70x), e4m3 handed over
#   156.6 (1.52x); BF16 197.6 (1.13x).
# PART=ptrows: the norm's FP8 rows with a static scale (per-tensor scheme) on / off (DGX_EMU_NORM_FP8_ROWS) alternated
#   twice, beside the channel scheme and BF16, after their GPU tests (norm, GEMV producer, the fast path's rows).
#   Measured (8dcd4c3): 30 GPU tests passed; per-tensor decode 296.8 / 296.9 us with the rows, 292.6 / 292.8 without,
#   verify 458.5 / 458.9 vs 468.1 / 468.3; channel decode 296.9 / 297.0, verify 462.5 / 462.7; BF16 decode 323.1: with
#   a static scale the norm makes rows from 2 rows only since.
# PART=final: the final tree: the GPU tests of check, medium BF16 / FP8 (channel and per-tensor) and maverick-slice FP8
#   decode, and the embedded model's generate plain and with the EAGLE-3 draft (device_prelude.sh gen_embedded).
# PART=mend: after the re-read's host-side mend of the rows' plumbing: the norm / fast-path / GEMV-producer GPU tests,
#   medium FP8 decode in both schemes.
#   Measured (29503ae): 30 passed; channel decode 296.8 us, verify 462.3; per-tensor decode 292.4, verify 457.1.
#   PART=check|gemv|closing|hostab|genab|static|ptrows|final|mend bash benchmarks/gpu_s14_session.sh
source benchmarks/device_prelude.sh
C=$(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null | cut -c1-7)
R="$OUT/res"; mkdir -p "$R"
if [[ "${PART:-check}" == check ]]; then
  TAIL=5 step tests 240 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_fused_norm.py \
      tests/test_fast_path.py tests/test_cuda_graphs.py tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py -k "'fused_norm or fast_path or graph or producer or gpu or split'"
  for spec in "medium bf16" "medium fp8" "maverick-slice fp8"; do
    set -- $spec
    TAIL=3 step "decode-$1-$2" 80 $DGX bench decode --model $1 --dtype $2 --modes graph --iters 150 \
        --out $R/h200-decode-$1-$2-s14-$C-tp1.json
  done
  TAIL=2 step trace-fp8 60 python benchmarks/step_trace.py --model medium --dtype fp8 --tokens 1 \
      --out $R/h200-medium-fp8-t1-$C-trace.json
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == closing ]]; then
  TAIL=3 step decode-embedded 90 $DGX bench decode --model embedded --dtype bf16 --modes graph --iters 150 \
      --out $R/h200-decode-embedded-bf16-s14-$C-tp1.json
  for spec in "plain --no-spec" "chain3 --draft-len=3"; do
    set -- $spec
    gen_embedded $1 $R/h200-generate-embedded-bf16-$1-$C.jsonl $2
  done
  python - "$R" "$C" <<'PY'
import json, sys
tokens = [json.loads(open(f"{sys.argv[1]}/h200-generate-embedded-bf16-{run}-{sys.argv[2]}.jsonl").read().splitlines()[-1])
          .get("token_ids") for run in ("plain", "chain3")]
print("same tokens:", tokens[0] == tokens[1] and tokens[0] is not None)
PY
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == hostab ]]; then
  rm -rf /tmp/old && mkdir -p /tmp/old && tar xzf .device/old.tar.gz -C /tmp/old && cp -r model/assets /tmp/old/model/  # unchanged since
  for round in r1 r2; do
    for tree in old new; do
      dir=$PWD; [[ $tree == old ]] && dir=/tmp/old
      GEN_DIR=$dir gen_embedded $tree-$round $R/h200-generate-embedded-bf16-plain-$tree-$round-$C.jsonl --no-spec
    done
  done
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == genab ]]; then
  for round in r1 r2 r3; do
    for spec in "plain --no-spec" "chain3 --draft-len=3"; do
      set -- $spec
      gen_embedded $1-$round $R/h200-generate-embedded-bf16-$1-$round-$C.jsonl $2
    done
  done
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == static ]]; then
  TAIL=12 step chain 200 "python benchmarks/persistent_probe.py --no-persistent --dtypes fp8,bf16 --given-fp8 \
      --static-fp8 --out $R/h200-gemv-chain-medium-static-$C.json | grep -v Warn"
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == ptrows ]]; then
  TAIL=4 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_fused_norm.py \
      tests/test_fast_path.py tests/test_kernel_linear_small_m.py -k "'static or rows or producer or graph'"
  for round in r1 r2; do
    for rows in 1 0; do
      TAIL=3 step "pt-rows$rows-$round" 80 "DGX_EMU_NORM_FP8_ROWS=$rows TRITON_CACHE_DIR=/tmp/tc-rows$rows $DGX bench \
          decode --model medium --dtype fp8 --fp8-scheme per-tensor --modes graph --iters 150 \
          --out $R/h200-ab-decode-medium-fp8-per-tensor-rows$rows-$round-$C-tp1.json"
    done
    TAIL=3 step "channel-$round" 80 $DGX bench decode --model medium --dtype fp8 --modes graph --iters 150 \
        --out $R/h200-decode-medium-fp8-ptrows-$round-$C-tp1.json
  done
  TAIL=3 step bf16 80 $DGX bench decode --model medium --dtype bf16 --modes graph --iters 150 \
      --out $R/h200-decode-medium-bf16-ptrows-$C-tp1.json
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == final ]]; then
  TAIL=5 step tests 260 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_fused_norm.py \
      tests/test_fast_path.py tests/test_cuda_graphs.py tests/test_kernel_linear_small_m.py \
      tests/test_kernel_moe_decode.py -k "'fused_norm or fast_path or graph or producer or gpu or split or static'"
  for spec in "medium bf16" "medium fp8" "medium fp8 per-tensor" "maverick-slice fp8"; do
    set -- $spec
    scheme=${3:+--fp8-scheme $3}
    TAIL=3 step "decode-$1-$2${3:+-$3}" 80 $DGX bench decode --model $1 --dtype $2 $scheme --modes graph --iters 150 \
        --out $R/h200-decode-$1-$2${3:+-$3}-final-$C-tp1.json
  done
  for spec in "plain --no-spec" "chain3 --draft-len=3"; do
    set -- $spec
    gen_embedded $1 $R/h200-generate-embedded-bf16-$1-final-$C.jsonl $2
  done
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == mend ]]; then
  TAIL=4 step tests 150 python -m pytest -q -p no:cacheprovider -o addopts= -rf tests/test_kernel_fused_norm.py \
      tests/test_fast_path.py tests/test_kernel_linear_small_m.py -k "'static or rows or producer or graph'"
  for scheme in channel per-tensor; do
    TAIL=3 step "decode-fp8-$scheme" 80 $DGX bench decode --model medium --dtype fp8 --fp8-scheme $scheme --modes graph \
        --iters 150 --out $R/h200-decode-medium-fp8-$scheme-mend-$C-tp1.json
  done
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
elif [[ "${PART}" == gemv ]]; then
  TAIL=60 step gemv 300 python benchmarks/gemv_bench.py --out $R/h200-gemv-$C.json
  tar czf "$OUT/res.tar.gz" -C "$OUT" res && rm -rf "$R"
fi
finish
