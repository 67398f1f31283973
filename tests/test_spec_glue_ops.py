"""The host-side glue of a speculative step stays small (benchmarks/spec_glue_ops.py counts it):
torch operators per step outside the forwards and graph steps, counted with a TorchDispatchMode
on CPU (each costs ~8-10 us of host time on a GPU), and reads that would stop the host.

Embedded model and shipped draft, fp32, batch 1, greedy. Before the glue was made static-shaped a
chain-of-3 step took ~386 such ops and ~10 host reads, the default tree ~1245 (and the graph
path as many); the bounds below sit just above what the code takes now, so a regression fails.
"""
from __future__ import annotations

import pytest

from benchmarks.spec_glue_ops import SPECS, measure
from collectives.communicator import SingleRankCommunicator
from tests.spec_reference import default_target, load_pair, shipped_draft
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# (spec, graph path) -> most ops per step; every step reads the host once, no more
BOUNDS = {("chain3", False): 60, ("chain3", True): 1, ("tree 4x5, 8 nodes", False): 270, ("tree 4x5, 8 nodes", True): 1}


@pytest.fixture(scope="module")
def pair():
    return load_pair(SingleRankCommunicator(), str(default_target()), str(shipped_draft()))


@pytest.mark.parametrize("name,graphs", list(BOUNDS))
def test_glue_ops_per_step_stay_under_their_bound(pair, name, graphs):
    model, draft = pair
    row = measure(model, draft, SPECS[name], graphs, tokens=24, sites=False)
    assert row["steps"] >= 5 and row["graph"] > 100, f"the count saw no forwards: {row}"
    assert row["ops"] <= BOUNDS[name, graphs], f"{name} ({'graph' if graphs else 'eager'}): {row}"
    assert row["syncs"] == 1.0, f"{name}: {row['syncs']} host reads per step, the engine needs one"
