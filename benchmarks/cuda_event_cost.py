"""What one CUDA-event timestamp costs from Python (the GPU path of tracing): creating and
recording an event, recording a pooled one, and turning it into a time (elapsed_time), each
timed over many calls on an idle GPU. Prints microseconds per call.

    python benchmarks/cuda_event_cost.py
"""
from __future__ import annotations

import ctypes
import statistics
import time

import torch


def per_call_us(fn, n: int = 20000) -> float:
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def cudart():
    """The CUDA runtime library torch loaded (from /proc/self/maps), or None."""
    for line in open("/proc/self/maps"):
        if "libcudart" in line:
            return ctypes.CDLL(line.split()[-1])
    return None


def main() -> None:
    stream = torch.cuda.current_stream()
    pool = [torch.cuda.Event(enable_timing=True) for _ in range(16)]
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    for e in pool:
        e.record()
    torch.cuda.synchronize()
    it = iter(range(10 ** 9))
    rows = {
        "new Event + record()": per_call_us(lambda: torch.cuda.Event(enable_timing=True).record()),
        "pooled record()": per_call_us(lambda: pool[next(it) & 15].record()),
        "pooled record(stream)": per_call_us(lambda: pool[next(it) & 15].record(stream)),
        "torch.cuda.current_stream()": per_call_us(torch.cuda.current_stream),
        "pooled C-level record(stream)": per_call_us(
            lambda: torch._C._CudaEventBase.record(pool[next(it) & 15], stream)),
        "elapsed_time": per_call_us(lambda: ref.elapsed_time(pool[next(it) & 15])),
        "monotonic_ns": per_call_us(time.monotonic_ns),
    }
    lib = cudart()
    if lib is not None:
        record, handles = lib.cudaEventRecord, [ctypes.c_void_p(e.cuda_event) for e in pool]
        record.argtypes, raw_stream = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p(stream.cuda_stream)
        rows["ctypes cudaEventRecord"] = per_call_us(lambda: record(handles[next(it) & 15], raw_stream))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cudart {'found' if lib else 'not found'}")
    for name, us in rows.items():
        print(f"{name:32s} {us:7.3f} us")


if __name__ == "__main__":
    main()
