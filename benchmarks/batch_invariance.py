"""Batch invariance, measured: does a request's output depend on what else is batched with it?

    python benchmarks/batch_invariance.py [--device cuda] [--dtype bf16] [--world-size 1|2]

Runs tests/test_batch_invariance.py's case (12 requests, each alone on the continuous-batching
engine, then all together with staggered joins) and prints, per request, the largest logit
difference between the two runs and whether the tokens agree. On CPU in fp32 every difference is
0 (the test asserts it). On GPUs nothing in the engine forces one kernel per row count (cuBLAS and
the Triton GEMVs pick tiles and split-K by the number of rows), so expect nonzero differences there
and read the token agreement. Saves benchmarks/results/batch_invariance_<device>_<dtype>_w<N>.json.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine, print_table, save
from cluster.procs import run_world
from collectives.communicator import SingleRankCommunicator
from model.embedded import default_model_dir
from tests.test_batch_invariance import invariance_case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--world-size", type=int, default=1, choices=(1, 2))
    args = p.parse_args()
    model = str(default_model_dir())
    if args.world_size == 1:
        if args.device == "cuda":
            torch.cuda.set_device(0)
        out = invariance_case(SingleRankCommunicator(), model, args.device, args.dtype)
    else:
        backend = "shm" if args.device == "cpu" else "nccl"
        out = run_world(2, invariance_case, model, args.device, args.dtype, backend=backend, device=args.device)
    rows, report = [], []
    for key in sorted(k for k in out if k.startswith("alone.")):
        rid = key.split(".", 1)[1]
        alone, batch = out[key].float(), out[f"batch.{rid}"].float()
        same_tokens = torch.equal(out[f"alone_tokens.{rid}"], out[f"batch_tokens.{rid}"])
        diff = (alone - batch).abs().max().item()
        identical_rows = sum(torch.equal(a, b) for a, b in zip(alone, batch))
        rows.append([rid, len(alone), identical_rows, f"{diff:.3g}", same_tokens])
        report.append({"request": rid, "tokens": len(alone), "bit_identical_rows": identical_rows,
                       "max_logit_diff": diff, "same_tokens": same_tokens})
    print_table(["request", "tokens", "bit-identical rows", "max |logit diff|", "same tokens"], rows)
    agree = sum(r["same_tokens"] for r in report)
    print(f"{agree}/{len(report)} requests kept their tokens; "
          f"{sum(r['bit_identical_rows'] for r in report)}/{sum(r['tokens'] for r in report)} logit rows bit-identical")
    path = save(f"batch_invariance_{args.device}_{args.dtype}_w{args.world_size}",
                {"machine": machine(), "args": vars(args), "requests": report})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
