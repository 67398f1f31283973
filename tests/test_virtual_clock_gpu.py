"""The virtual clock on GPU ranks (skipped without a GPU): a real emulated run on CUDA, bf16, with
the fused kernels on one GPU and NCCL between two, equals the shape-only walk op by op, and (two
GPUs) a rank made later in virtual time holds both ranks' collective ends at the last arrival plus
the slowest transfer. The same checks as tests/test_virtual_clock.py, on the GPU path.

    python -m pytest -q tests/test_virtual_clock_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from model.config import tiny
from model.embedded import random_state_dict, write_checkpoint
from tests.virtual_clock_session import LATE_S, NEW_TOKENS, session_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("clock_gpu_ckpt")
    cfg = tiny(vocab_size=509)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=4, std=0.08))
    return path


def _check_steps(out: dict) -> None:
    assert len(out["real_steps"]) == NEW_TOKENS and int(out["ops"]) > 0
    assert torch.allclose(out["real_steps"], out["walk_steps"], rtol=1e-12, atol=0)


def test_one_gpu_fused_path_clock_equals_the_walk(ckpt, tmp_path):
    _check_steps(session_rank(SingleRankCommunicator(), str(ckpt), str(tmp_path), "cuda", "bf16"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_clock_equals_the_walk_and_waits_for_the_late_rank(ckpt, tmp_path):
    out = run_world(2, session_rank, str(ckpt), str(tmp_path), "cuda", "bf16", backend="nccl", device="cuda")
    _check_steps(out)
    exercise = out["exercise"]
    for call in range(4):
        ends = exercise[:, call, 2]
        assert torch.allclose(ends, (exercise[:, call, 0].max() + exercise[:, call, 1].max()).expand(2), rtol=1e-12)
    assert exercise[1, 0, 0] - exercise[0, 0, 0] == pytest.approx(LATE_S)
    assert exercise[:, :, 3].eq(1).all()
