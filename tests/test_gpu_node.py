"""The same sharded-equals-unsharded check on real GPUs: NCCL between processes, one GPU each.
Skips itself on a machine with fewer than 2 GPUs."""
from __future__ import annotations

import pytest
import torch

from collectives.communicator import SingleRankCommunicator
from cluster.procs import run_world
from tests.test_sharded import PROMPT_LENGTHS, _run_model, checkpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(scope="module")
def gpu_reference(checkpoint):  # noqa: F811
    torch.backends.cuda.matmul.allow_tf32 = False
    return {k: v.cpu() for k, v in _run_model(SingleRankCommunicator(), str(checkpoint), "tp", "cuda").items()}


@pytest.mark.parametrize("moe_mode", ["tp", "ep"])
def test_two_gpus_over_nccl_match_one_gpu(checkpoint, gpu_reference, moe_mode):  # noqa: F811
    got = run_world(2, _run_model, str(checkpoint), moe_mode, "cuda", backend="nccl", device="cuda")
    for b, n in enumerate(PROMPT_LENGTHS):
        diff = (got["logits"][b, :n] - gpu_reference["logits"][b, :n]).abs().max().item()
        assert diff < 1e-4, f"row {b}: max abs logit difference {diff}"
    assert torch.equal(got["tokens"], gpu_reference["tokens"])
