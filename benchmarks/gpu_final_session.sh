#!/usr/bin/env bash
# The closing device call of a GPU session on nvidia-h200-x2: GPU tests of what changed, then every
# number the closing notes quote, in one run (results under $OUT, at most 8 files come back).
# Carry .device (raysite.tar.xz, and head.tar.gz = `git archive HEAD | gzip`: that committed tree runs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site "$OUT/logs"
tar xJf .device/raysite.tar.xz -C /tmp/site
if [[ -f .device/head.tar.gz ]]; then
  mkdir -p /tmp/head && tar xzf .device/head.tar.gz -C /tmp/head && cp -r .device /tmp/head/ && cd /tmp/head
  echo "running the archived HEAD: $(zcat .device/head.tar.gz | git get-tar-commit-id 2>/dev/null)"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
       NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
DGX="python -m launch"
L="$OUT/logs"
echo "== GPU tests"
timeout ${TEST_TIMEOUT:-170} python -m pytest -q -p no:cacheprovider -o addopts="" ${TESTS} > "$L/pytest.txt" 2>&1
tail -15 "$L/pytest.txt" | grep -v "^SKIPPED"
echo "== decode steps (graph replay), TP1 and TP2"
for spec in "medium bf16 1" "medium bf16 2" "medium fp8 1" "maverick-slice fp8 1" "maverick-slice fp8 2"; do
  set -- $spec
  timeout 60 $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph --iters 150 \
      --out "$OUT/h200x2-decode-$1-$2-tp$3.json" > "$L/decode-$1-$2-tp$3.txt" 2>&1
  grep -E "graph " "$L/decode-$1-$2-tp$3.txt" | sed "s/^/tp$3 /" || tail -3 "$L/decode-$1-$2-tp$3.txt"
done
echo "== generate, embedded, bf16 (tok/s, p50 step)"
gen() { local tag=$1; shift
  timeout 60 $DGX generate --device cuda --dtype bf16 --prompt "The DGX B200 node is" --max-new-tokens 300 \
      --ignore-eos --json "$@" > "$L/gen-$tag.json" 2> "$L/gen-$tag.err"
  tail -1 "$L/gen-$tag.json" | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$tag', 'tok/s', round(d['tokens_per_s'],1), 'AL', d.get('acceptance_length'), 'p50 ms', round(d['step_latency_s']['p50']*1e3,4))" 2>/dev/null \
      || { echo "$tag failed:"; tail -3 "$L/gen-$tag.err"; }
}
gen w1-plain --world-size 1 --no-spec
gen w1-plain-traced --world-size 1 --no-spec --trace /tmp/tr1
gen w1-plain-again --world-size 1 --no-spec
gen w1-chain3 --world-size 1 --draft-len=3
gen w2-plain --world-size 2 --no-spec
$DGX trace summary /tmp/tr1 > "$L/trace-summary.txt" 2>&1; head -20 "$L/trace-summary.txt"
[[ -n "${EXTRA:-}" ]] && { echo "== extra"; eval "$EXTRA"; }
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$L"
echo done
