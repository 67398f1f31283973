#!/usr/bin/env bash
# Sourced at the start of a device call (`source benchmarks/device_prelude.sh; step ...; finish`): unpacks the
# Ray bundle (.device/raysite.tar.xz, ../shared/device/make-ray-bundle.sh) and, when carried, runs the committed
# tree in .device/head.tar.gz (`git archive HEAD | gzip`) rather than the working copy, whose .git on the
# device may be older than the checkout. `step NAME SECONDS CMD...` runs one bounded step, logs all of its
# output, and prints its last lines; `finish` packs the logs (a device call brings back at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT/logs" /tmp/site
tar xJf .device/raysite.tar.xz -C /tmp/site
if [[ -f .device/head.tar.gz ]]; then
  rm -rf /tmp/head && mkdir -p /tmp/head && tar xzf .device/head.tar.gz -C /tmp/head && cp -r .device /tmp/head/ && cd /tmp/head
  echo "running the archived HEAD $(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null)"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
       NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
DGX="python -m launch"
L="$OUT/logs"
step() {  # step NAME SECONDS CMD...: at most SECONDS; all output in logs/NAME.txt; prints its tail
  local name=$1 seconds=$2; shift 2
  local t0=$SECONDS
  timeout -s INT -k 15 "$seconds" bash -c "$*" > "$L/$name.txt" 2>&1; local rc=$?
  echo "== $name (rc $rc, $((SECONDS - t0)) s)"; tail -${TAIL:-12} "$L/$name.txt" | grep -v '^SKIPPED' | cut -c1-220
}
ab_bench() {  # ab_bench VAR VALUE MODEL DTYPE FILE: one graph-timed decode bench with VAR=VALUE, its own Triton cache,
  # if the call has time left (DEADLINE - 45 s)
  if (( SECONDS > ${DEADLINE:-550} - 45 )); then echo "== $5 skipped (no time left)"; return; fi
  TAIL=3 step "$5" 100 "$1=$2 TRITON_CACHE_DIR=/tmp/tc-$1-$2 $DGX bench decode --model $3 --dtype $4 --modes graph \
      --iters 150 --out $R/$5.json"
}
gen_embedded() {  # gen_embedded NAME FILE ARGS...: `generate` of the embedded model in bf16 on the GPU (300 tokens,
  # --json) into FILE, from the tree in GEN_DIR (default: this one); prints its tokens/s, step p50 and acceptance
  local name=$1 file=$2 dir=${GEN_DIR:-$PWD}; shift 2
  TAIL=2 step "generate-$name" 90 "cd $dir && PYTHONPATH=/tmp/site:$dir $DGX generate --device cuda --world-size 1 \
      --dtype bf16 --prompt 'The DGX B200 node is' --max-new-tokens 300 --ignore-eos --json $* > $file"
  tail -1 "$file" | python -c "import json, sys; d = json.loads(sys.stdin.read()); print('$name tok/s', \
round(d['tokens_per_s'], 1), 'p50 us', round(d['step_latency_s']['p50'] * 1e6, 1), 'acceptance', d.get('acceptance_length'))"
}
finish() { tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$L"; echo "done"; }
