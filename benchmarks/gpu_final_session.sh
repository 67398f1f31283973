#!/usr/bin/env bash
# The closing device call of a GPU session on nvidia-h200-x2: the GPU tests of what changed ($TESTS), then every
# number the closing notes quote, in one run (results under $OUT; logs in logs.tar.gz). Carry .device
# (raysite.tar.xz, and head.tar.gz = `git archive HEAD | gzip`: that committed tree runs; device_prelude.sh).
#   TESTS="tests/test_a.py tests/test_b.py" TEST_TIMEOUT=250 bash benchmarks/gpu_final_session.sh
source benchmarks/device_prelude.sh
if [[ -n "${TESTS:-}" ]]; then
  TAIL=25 step tests "${TEST_TIMEOUT:-250}" python -m pytest -q -p no:cacheprovider -o addopts= --durations=8 -rf $TESTS
fi
for spec in "medium bf16 1" "medium bf16 2" "medium fp8 1" "maverick-slice fp8 1" "maverick-slice fp8 2"; do
  set -- $spec
  extra=""; [[ "$1 $2 $3" == "medium bf16 1" ]] && extra="--profile $L/profile-medium-bf16"
  TAIL=3 step "decode-$1-$2-tp$3" 75 $DGX bench decode --model $1 --dtype $2 --tp $3 --modes graph --iters 150 $extra \
      --out "$OUT/h200x2-decode-$1-$2-tp$3.json"
done
gen() { local tag=$1; shift
  timeout 75 $DGX generate --device cuda --dtype bf16 --prompt "The DGX B200 node is" --max-new-tokens 300 \
      --ignore-eos --json "$@" > "$L/gen-$tag.json" 2> "$L/gen-$tag.err"
  tail -1 "$L/gen-$tag.json" | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$tag', 'tok/s', round(d['tokens_per_s'],1), 'AL', d.get('acceptance_length'), 'p50 ms', round(d['step_latency_s']['p50']*1e3,4))" 2>/dev/null \
      || { echo "$tag failed:"; tail -3 "$L/gen-$tag.err"; }
}
echo "== generate, embedded, bf16 (tok/s, p50 step)"
gen w1-plain --world-size 1 --no-spec
gen w1-plain-traced --world-size 1 --no-spec --trace /tmp/tr1
gen w1-chain3 --world-size 1 --draft-len=3
gen w2-plain --world-size 2 --no-spec
$DGX trace summary /tmp/tr1 > "$L/trace-summary.txt" 2>&1
[[ -n "${EXTRA:-}" ]] && { echo "== extra"; eval "$EXTRA"; }
finish
