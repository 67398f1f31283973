"""GPU stamps: the fused add+RMSNorm kernel writes begin/end timestamps into a ledger while one is
active, with the same numbers as without, and nothing when none is (on CPU: Triton's interpreter,
whose stand-in time is the slot index x 1000; on a GPU: %globaltimer, checked against host time)."""
import time

import pytest
import torch

from collectives import fused_norm, gpu_stamps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(rows: int = 3, hidden: int = 96):
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    make = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    return make(rows, hidden), make(rows, hidden), make(hidden), 1e-5


def test_stamped_kernel_computes_the_same_and_labels_its_slots():
    partial, residual, weight, eps = _inputs()
    plain = fused_norm.add_rmsnorm(partial, residual, weight, eps)
    ledger = gpu_stamps.StampLedger(DEVICE, capacity=8)
    with gpu_stamps.stamping(ledger):
        first = fused_norm.add_rmsnorm(partial, residual, weight, eps)
        second = fused_norm.add_rmsnorm(partial, residual, weight, eps)
    assert gpu_stamps.active() is None
    for a, b in zip(plain + plain, first + second):
        assert torch.equal(a, b)
    read = ledger.read()
    op = ("allreduce_add_rmsnorm", partial.nbytes, partial.dtype)
    assert [label for label, _ in read] == [("begin", *op), ("end", *op)] * 2
    times = [t for _, t in read]
    assert times == sorted(times) and times[0] < times[-1]
    fused_norm.add_rmsnorm(partial, residual, weight, eps)  # no ledger active: no slot taken
    assert len(ledger.labels) == 4


def test_ledger_refuses_past_capacity_and_rewinds():
    ledger = gpu_stamps.StampLedger(DEVICE, capacity=2)
    ledger.take(("a",))
    ledger.take(("b",))
    with pytest.raises(RuntimeError, match="full"):
        ledger.take(("c",))
    ledger.rewind(1)
    assert ledger.take(("c",)) == 1 and ledger.labels == [("a",), ("c",)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU timer needs a GPU")
def test_calibrated_gpu_stamps_land_inside_the_host_interval():
    ledger = gpu_stamps.StampLedger("cuda", capacity=4)
    bracket = ledger.calibrate()
    torch.cuda.synchronize()
    before = time.monotonic_ns()
    ledger.stamp(("probe",))
    torch.cuda.synchronize()
    after = time.monotonic_ns()
    (_, t), = ledger.read()
    assert before - bracket <= t <= after + bracket
