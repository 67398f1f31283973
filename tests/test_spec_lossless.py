"""Speculative greedy decoding is lossless: EAGLE-3 output equals plain greedy output, token for
token, on 56 prompts, for chains and EAGLE-2 trees, at world size 1 and 8 (the shared-memory
communicator), with the MoE in tp and ep modes. fp32, seeded, no tolerance: 100% is required.

The target is the embedded default model (rebuilt in a test directory) and the draft the toy-trained
one shipped with it, so drafts really are accepted: the tests check that they are, with different
accepted lengths for different rows of one batch, which exercises rollback, the compaction of
accepted tree paths and the draft's rebuild from target features. Budgets differ per row (so
rows stop mid-step) and EOS ends rows as in plain decoding. At world size 8 the acceptance
lengths must also match world size 1: the tensor-parallel draft proposes what the unsharded one does.
"""
from __future__ import annotations

import pytest
import torch

from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from model.sampling import SamplingParams
from model.spec import SpecConfig
from tests.spec_reference import default_target, load_pair, random_prompts, shipped_draft, token_table
from tests.spec_reference import one_thread  # noqa: F401 (a fixture)
from workers.engine import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see tests/spec_reference.py

N_PROMPTS = 56
NEW_TOKENS = 12
SPECS = {
    "chain1": SpecConfig(draft_len=1),
    "chain3": SpecConfig(draft_len=3),
    "chain5": SpecConfig(draft_len=5),
    "tree": SpecConfig(tree=True, top_k=4, depth=5, tree_tokens=8),
    "tree_wide_shallow": SpecConfig(tree=True, top_k=3, depth=4, tree_tokens=3),
}
WORLD8_SPECS = ("chain3", "tree")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return default_target()


def _requests() -> list[Request]:
    prompts = random_prompts(N_PROMPTS, 512, seed=7)
    return [Request(p, SamplingParams(max_new_tokens=NEW_TOKENS - i % 4), str(i)) for i, p in enumerate(prompts)]


def _decode(comm, target_path: str, draft_path: str, moe_modes: tuple[str, ...], spec_names: tuple[str, ...]) -> dict:
    """Plain greedy and every named spec, per MoE mode: token tables and per-request acceptance lengths."""
    out = {}
    for moe in moe_modes:
        model, draft = load_pair(comm, target_path, draft_path, moe)
        engine = Engine(model, draft=draft)
        plain, _ = engine.generate(_requests())
        out[f"{moe}/plain"] = token_table(plain, NEW_TOKENS)
        for name in spec_names:
            done, _ = engine.generate(_requests(), spec=SPECS[name])
            out[f"{moe}/{name}"] = token_table(done, NEW_TOKENS)
            out[f"{moe}/{name}/al"] = torch.tensor([c.spec["acceptance_length"] for c in done], dtype=torch.float64)
            out[f"{moe}/{name}/deep"] = torch.tensor([(c.spec["acceptance_per_position"] + [0, 0])[1] for c in done])
    return out


@pytest.fixture(scope="module")
def world1(target):
    return _decode(SingleRankCommunicator(), str(target), str(shipped_draft()), ("tp", "ep"), tuple(SPECS))


@pytest.fixture(scope="module")
def world8(target):
    return run_world(8, _decode, str(target), str(shipped_draft()), ("tp", "ep"), WORLD8_SPECS,
                     backend="shm", timeout_s=300.0)


def _mismatches(got: torch.Tensor, want: torch.Tensor) -> list[int]:
    return [i for i in range(len(want)) if not torch.equal(got[i], want[i])]


@pytest.mark.parametrize("moe", ["tp", "ep"])
@pytest.mark.parametrize("name", list(SPECS))
def test_world1_speculative_equals_greedy(world1, moe, name):
    bad = _mismatches(world1[f"{moe}/{name}"], world1[f"{moe}/plain"])
    assert not bad, f"{len(bad)}/{N_PROMPTS} prompts differ, first: {bad[0]}"


@pytest.mark.parametrize("name", list(SPECS))
def test_drafts_are_accepted_with_per_row_lengths(world1, name):
    """The toy draft is weak (acceptance length ~1.05 for chains, ~1.2 for trees), but it must be
    accepted often enough that accepted paths, several drafts deep, get compacted and re-read."""
    lengths = world1[f"tp/{name}/al"]
    assert float(lengths.mean()) > 1.02, f"mean acceptance length {float(lengths.mean()):.3f}: the draft proves little"
    assert len(set(lengths.tolist())) >= 3, "rows of one batch should accept different numbers of drafts"
    if name in ("chain3", "chain5", "tree"):  # (tree_wide_shallow's 3 best nodes are mostly siblings)
        assert float(world1[f"tp/{name}/deep"].max()) > 0, "no step accepted two drafts in a row"


@pytest.mark.parametrize("moe", ["tp", "ep"])
@pytest.mark.parametrize("name", WORLD8_SPECS)
def test_world8_speculative_equals_greedy(world8, world1, moe, name):
    assert torch.equal(world8[f"{moe}/plain"], world1["tp/plain"]), "sharded plain greedy differs from unsharded"
    bad = _mismatches(world8[f"{moe}/{name}"], world8[f"{moe}/plain"])
    assert not bad, f"{len(bad)}/{N_PROMPTS} prompts differ at world size 8, first: {bad[0]}"
    # the tensor-parallel draft drafts what the unsharded one does (up to fp32 near-ties in top-k)
    diff = (world8[f"{moe}/{name}/al"] - world1[f"tp/{name}/al"]).abs().mean()
    assert float(diff) < 0.02, f"acceptance lengths at world 8 differ from world 1 by {float(diff):.4f} on average"
