"""CUDA graphs of speculative decoding and of sampling (GPU only; the control flow is tested on CPU
in tests/test_spec_graph_loop.py and tests/test_graph_loop.py).

On the embedded model and its shipped EAGLE-3 draft, fused kernels:
  * every captured step (verify over a random tree, padded catch-up, each depth's draft step)
    equals the eager forward it replaces, fp32 tightly and bf16 within bf16's rounding;
  * speculative generation on graphs (chain and tree) gives the tokens of speculative generation
    without graphs, and of plain greedy decoding, for 128 tokens, fp32 and bf16; a greedy step is
    one graph replay and one host read;
  * sampling inside the decode graph reproduces with a seed: the same tokens replayed twice, and
    with graphs off (the device sampler draws alike eagerly), a greedy row beside sampled ones
    stays greedy, and speculative sampling on graphs reproduces too;
  * with two GPUs, tensor parallelism over NCCL captures (every rank the same steps) and gives
    the eager tokens, plain and speculative.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from model.config import load_model_config
from model.eagle3_checkpoint import load_draft
from model.embedded import default_draft_dir, ensure_default_model
from model.parallel import layout
from model.sampling import SamplingParams
from model.spec import SpecConfig
from tests.spec_graph_checks import check_static_steps
from workers.engine import Engine, Request
from workers.model_build import build_model
from workers.run_config import RunConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEW = 128
# batch 2: a verify step of 2 x (tokens + 1) rows must fit the 16 rows of a graph step
SPECS = {"chain3": SpecConfig(draft_len=3), "tree": SpecConfig(tree=True, top_k=3, depth=4, tree_tokens=7)}


def _pair(dtype: str, comm=None):
    path = ensure_default_model()
    comm = comm or SingleRankCommunicator()
    run = RunConfig(model_path=str(path), dtype=dtype, device="cuda", world_size=comm.world_size,
                    comm="nccl" if comm.world_size > 1 else "gloo", kernels="triton")
    cfg = load_model_config(path)
    model, _ = build_model(run, cfg, layout(cfg, comm.world_size, comm.rank, "tp"), comm)
    draft, _ = load_draft(default_draft_dir(), model)
    return model.eval(), draft, run.kv_torch_dtype


def _requests(seed: int, params: SamplingParams, rows: int = 2) -> list[Request]:
    """Prompts of fresh lengths; the second row stops early."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 90, (rows,), generator=gen).tolist()
    budgets = [params.max_new_tokens] + [max(1, params.max_new_tokens // 3)] * (rows - 1)
    return [Request(tuple(torch.randint(3, 500, (n,), generator=gen).tolist()),
                    dataclasses.replace(params, max_new_tokens=budget), str(i))
            for i, (n, budget) in enumerate(zip(lengths, budgets))]


def _tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


GREEDY = SamplingParams(max_new_tokens=NEW, stop_on_eos=False)


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 6e-2)])
@pytest.mark.parametrize("name", list(SPECS))
def test_captured_steps_equal_eager_steps(dtype, tol, name):
    model, draft, _ = _pair(dtype)
    check_static_steps(model, draft, SPECS[name], capture_it=True, tol=tol, seed=3)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def spec_runs(request):
    """Per spec: tokens with graphs, without, and plain greedy (with and without graphs)."""
    model, draft, kv_dtype = _pair(request.param)
    on = Engine(model, kv_dtype=kv_dtype, draft=draft, cuda_graphs="on")
    off = Engine(model, kv_dtype=kv_dtype, draft=draft, cuda_graphs="off")
    requests = _requests(1, GREEDY)
    runs = {"plain": _tokens(off.generate(requests)[0]), "plain_graph": _tokens(on.generate(requests)[0])}
    for name, spec in SPECS.items():
        got, _ = on.generate(requests, spec=spec)
        runs[name] = _tokens(got)
        runs[name + "/accepted"] = [c.spec["acceptance_length"] for c in got]
        runs[name + "/eager"] = _tokens(off.generate(requests, spec=spec)[0])
        bucket = next(reversed(on.spec_graphs.graphs.values()))
        runs[name + "/replays"] = bucket.step.graph is not None and bucket.step.calls > 0  # one graph a step
    runs["dtype"] = request.param
    return runs


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_on_graphs_equals_spec_eager(spec_runs, name):
    assert spec_runs[name + "/replays"], "the speculative steps did not replay graphs"
    assert spec_runs[name] == spec_runs[name + "/eager"]
    assert [len(t) for t in spec_runs[name]] == [NEW, NEW // 3]
    assert max(spec_runs[name + "/accepted"]) > 1.0, "no draft accepted: the graphs' catch-up went untested"


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_on_graphs_equals_plain_greedy(spec_runs, name):
    """bf16: a verify step reads N+1 rows where a decode step reads one; kernels that round
    differently by row count could flip a near-tie (then the eager spec test above still holds)."""
    assert spec_runs["plain_graph"] == spec_runs["plain"]
    assert spec_runs[name] == spec_runs["plain"], f"{spec_runs['dtype']}: speculative output differs from greedy"


def test_a_greedy_speculative_step_reads_the_host_once():
    """On graphs a greedy step is one replay and one read of its output table: CUDA's sync debug
    mode sees exactly one synchronizing call per step (the read), and the steps run at most a few
    hundred us each (the eager glue between replays used to cost ~7 ms a step)."""
    import time
    import traceback
    import warnings

    from workers.speculative import SpecDecoder
    model, draft, kv_dtype = _pair("bf16")
    on = Engine(model, kv_dtype=kv_dtype, draft=draft, cuda_graphs="on")
    requests = _requests(6, dataclasses.replace(GREEDY, max_new_tokens=64), rows=1)
    on.generate(requests, spec=SPECS["chain3"])  # captures
    step, syncs, sites, seconds = SpecDecoder.speculative_step, [], [], []

    def counted(self, *args, **kwargs):
        caught = []  # (message, the innermost frame outside torch that led to it)

        def keep(message, category, filename, lineno, file=None, line=None):
            ours = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                    and "/warnings.py" not in f.filename]
            caught.append((str(message), f"{ours[-1].filename}:{ours[-1].lineno}" if ours else f"{filename}:{lineno}"))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = keep
            torch.cuda.set_sync_debug_mode("warn")
            begin = time.perf_counter()
            try:
                return step(self, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - begin)
                torch.cuda.set_sync_debug_mode("default")
                where = [site for message, site in caught if "synchroniz" in message]
                syncs.append(len(where))
                sites.append(where)
    SpecDecoder.speculative_step = counted
    try:
        done, _ = on.generate(requests, spec=SPECS["chain3"])
    finally:
        SpecDecoder.speculative_step = step
    assert done[0].spec["one_graph_steps"] == done[0].spec["verify_steps"] == len(syncs) > 5
    assert syncs == [1] * len(syncs), f"host syncs per step: {syncs}; where, by step: {sites[:3]}"
    median = sorted(seconds)[len(seconds) // 2]
    assert median < 2e-3, f"median speculative step {1e3 * median:.2f} ms: the host is in the way again"


def test_sampling_in_the_decode_graph_reproduces_with_a_seed():
    model, draft, kv_dtype = _pair("bf16")
    on = Engine(model, kv_dtype=kv_dtype, cuda_graphs="on")
    off = Engine(model, kv_dtype=kv_dtype, cuda_graphs="off")
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=NEW, stop_on_eos=False)
    requests = _requests(2, sampled, rows=3)
    requests[2] = dataclasses.replace(requests[2], params=dataclasses.replace(GREEDY, max_new_tokens=NEW // 3))
    first, again = _tokens(on.generate(requests)[0]), _tokens(on.generate(requests)[0])
    assert first == again, "the same seeds drew other tokens on a reused graph"
    assert first == _tokens(off.generate(requests)[0]), "replayed draws differ from eager draws"
    graph = next(iter(on.graphs.graphs.values()))
    assert graph.sample_graph is not None and graph.sampling
    reseeded = [dataclasses.replace(r, params=dataclasses.replace(r.params, seed=70)) if i == 0 else r
                for i, r in enumerate(requests)]
    other = _tokens(on.generate(reseeded)[0])
    assert other[0] != first[0] and other[1:] == first[1:]
    greedy = _tokens(on.generate([dataclasses.replace(r, params=dataclasses.replace(GREEDY, max_new_tokens=NEW // 3))
                                  for r in requests])[0])
    assert first[2] == greedy[2], "a greedy row beside sampled rows decoded differently"
    assert len(set(first[0])) > 8, "degenerate output proves little"


def test_speculative_sampling_on_graphs_reproduces():
    model, draft, kv_dtype = _pair("bf16")
    on = Engine(model, kv_dtype=kv_dtype, draft=draft, cuda_graphs="on")
    sampled = SamplingParams(temperature=0.7, top_k=40, seed=5, max_new_tokens=64, stop_on_eos=False)
    requests = _requests(4, sampled)
    first = _tokens(on.generate(requests, spec=SPECS["chain3"])[0])
    assert first == _tokens(on.generate(requests, spec=SPECS["chain3"])[0])
    assert [len(t) for t in first] == [64, 64 // 3]


def _tp2(comm, dtype: str) -> dict[str, torch.Tensor]:
    model, draft, kv_dtype = _pair(dtype, comm)
    out = {}
    for graphs in ("on", "off"):
        engine = Engine(model, kv_dtype=kv_dtype, draft=draft, cuda_graphs=graphs)
        requests = _requests(5, GREEDY)
        plain, _ = engine.generate(requests)
        spec, _ = engine.generate(requests, spec=SPECS["chain3"])
        for name, done in (("plain", plain), ("chain3", spec)):
            out[f"{graphs}/{name}"] = torch.tensor([c.token_ids + [-1] * (NEW - len(c.token_ids)) for c in done])
        if graphs == "on":
            assert engine.graphs is not None and engine.spec_graphs is not None, "TP2 steps did not capture"
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_steps_capture_over_nccl():
    from cluster.procs import run_world
    got = run_world(2, _tp2, "fp32", backend="nccl", device="cuda", timeout_s=600.0)
    assert got, "rank 0 returned nothing"
    assert torch.equal(got["on/plain"], got["off/plain"])
    assert torch.equal(got["on/chain3"], got["off/chain3"])
    assert torch.equal(got["on/chain3"], got["on/plain"])
