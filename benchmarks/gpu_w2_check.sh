#!/usr/bin/env bash
# One device call (nvidia-h200-x2): are world-2 greedy tokens (embedded model, bf16) the same at HEAD and at the
# session-start commit (ee83328, .device/base.tar.gz), graph and eager? (They differed from world 1 at e004bb9.)
source benchmarks/device_prelude.sh
mkdir -p /tmp/base && tar xzf .device/base.tar.gz -C /tmp/base && cp -r model/assets /tmp/base/model/  # the same weights (left out of the archive)
G="generate --device cuda --dtype bf16 --prompt The_DGX_B200_node_is --max-new-tokens 200 --ignore-eos --json --no-spec"
step head-w2 90 python -m launch $G --world-size 2
step head-w2-eager 90 python -m launch $G --world-size 2 --cuda-graphs off
(cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 90 python -m launch $G --world-size 2 > $L/base-w2.txt 2>&1; echo base rc $?)
(cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 90 python -m launch $G --world-size 1 > $L/base-w1.txt 2>&1; echo base-w1 rc $?)
python - <<'PY'
import json
def ids(f):
    try: return json.loads(open(f).read().strip().splitlines()[-1])['token_ids']
    except Exception as e: return str(e)[:80]
L='/tmp/gpu_out/logs' 
import os; L=os.environ.get('OUT','/tmp/gpu_out')+'/logs'
r={k:ids(f'{L}/{k}.txt') for k in ('head-w2','head-w2-eager','base-w2','base-w1')}
for k,v in r.items(): print(k, v[:12] if isinstance(v,list) else v)
print('head w2 == base w2:', r['head-w2']==r['base-w2'], '| head w2 graph == eager:', r['head-w2']==r['head-w2-eager'], '| base w2 == base w1:', r['base-w2']==r['base-w1'])
PY
finish
