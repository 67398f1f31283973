"""GPU stamps: the fused add+RMSNorm kernel writes begin/end timestamps into a ledger while one is
active, with the same numbers as without, and nothing when none is (on CPU: Triton's interpreter,
whose stand-in time is the slot index x 1000; on a GPU: %globaltimer, checked against host time)."""
import time
from collections import Counter

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


def test_a_traced_steps_first_and_last_kernels_stamp_its_begin_and_end():
    """A traced decode graph needs no stamp kernels of its own: the embedding kernel (the step's first
    launch) stamps ("step", "begin") and the greedy argmax (its last) ("step", "end"), and that argmax
    writes the ids straight into the ledger slots just before the step's stamps (one copy to the host
    brings both), which are also the next step's input. The ids equal an untraced step's."""
    from benchmarks.launch_count import _gpu_norm, _gpu_pick, count_launches, small_config
    from workers.cuda_graphs import DecodeGraph
    from workers.step_bench import random_model
    model = random_model(small_config("medium"), "bf16", "triton", device=DEVICE)
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=gen).to(DEVICE)
    picked = {}
    for traced in (False, True):
        cache = model.new_cache(1, 32)
        with torch.no_grad():
            model(prompt, cache)  # the history (torch ops)
        ledger = gpu_stamps.StampLedger(DEVICE, capacity=128) if traced else None
        step = DecodeGraph.__new__(DecodeGraph)
        ids_slot = step._buffers(model, cache, 1, ledger)
        step.tokens[:, 0] = prompt[:, -1]
        order: list[str] = []
        with torch.no_grad(), _gpu_norm(), _gpu_pick(), count_launches(Counter(), order):
            if traced:
                with gpu_stamps.stamping(ledger):
                    ledger.expect_edges()
                    logits = step._step()
            else:
                logits = step._step()
        picked[traced] = step.next_ids.clone()
        assert order[0] == "triton _embed_norm_kernel" and order[-1] == "triton _argmax_kernel"
        assert torch.equal(step.next_ids, logits[:, -1].float().argmax(-1))
        assert step.tokens.data_ptr() == step.next_ids.data_ptr()  # the next step's input, no copy
    assert torch.equal(picked[True], picked[False])
    assert ledger.folded_edges == {"begin", "end"}
    labels = ledger.labels[ids_slot:]
    assert labels[0] == ("ids", 0) and labels[1] == ("step", "begin") and labels[-1] == ("step", "end")
    assert ("step", "begin") not in labels[2:] and sum(label[0] == "begin" for label in labels) == 16  # the norms
    stamps = ledger.stamps[ids_slot + 1:len(ledger.labels)].tolist()
    if DEVICE == "cpu":  # the interpreter's stand-in times: every slot written by its kernel
        assert stamps == [1000 * slot for slot in range(ids_slot + 1, len(ledger.labels))]
    else:  # GPU times: every slot written, none before the begin or after the end
        assert min(stamps) > 0 and all(stamps[0] <= t <= stamps[-1] for t in stamps)


def test_a_stamp_taken_first_by_another_kernel_leaves_the_begin_to_a_stamp_kernel():
    partial, residual, weight, eps = _inputs()
    ledger = gpu_stamps.StampLedger(DEVICE, capacity=8)
    with gpu_stamps.stamping(ledger):
        ledger.expect_edges()
        fused_norm.add_rmsnorm(partial, residual, weight, eps)
        assert gpu_stamps.step_edge("begin") == (None, 0)  # too late: the step had begun
        buffer, slot = gpu_stamps.step_edge("end")
        assert buffer is ledger.stamps and ledger.labels[slot] == ("step", "end")
        assert gpu_stamps.step_edge("end") == (None, 0)  # taken once
    assert ledger.folded_edges == {"end"}
