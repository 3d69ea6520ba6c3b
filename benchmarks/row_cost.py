"""What the argument check costs, measured side by side in one run on real gloo ranks:

- ``minimal``: the smallest reduction a clip could make, one float64 all_reduce of the local p-th power;
- ``no check``: distclip's reduction without the arguments: each rank's 2-value row (local norm, has
  elements) all-gathered by one all_reduce, and the total combined from the rows;
- ``distclip``: the real one, whose rows also carry norm_type, max_norm and error_if_nonfinite, read on the
  host and compared on every rank.

``distclip`` minus ``no check`` is the cost of detecting mismatched calls.
Run: python benchmarks/row_cost.py [--nproc 4] [--calls 2000]."""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distclip._clip import partials, reduction, row, total_norm
from distclip._clip.foreach import by_device_and_dtype


def _rank(rank: int, world_size: int, port: int, calls: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    grads = [torch.randn(1000) for _ in range(4)]
    arguments = (2.0, 1.0, 0.0)

    def minimal():
        local = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)))
        dist.all_reduce(local.pow(2))

    def reduced(arguments, check):
        def run():
            local = partials.local_norm(by_device_and_dtype(grads), 2.0, None, torch.device("cpu"))
            rows = reduction.gather_rows(row.encode(local, arguments, torch.device("cpu")), dist.group.WORLD)
            if check:
                row.check_agreement(rows)
            total_norm.from_rows(rows, 2.0)

        return run

    variants = [("minimal", minimal), ("no check", reduced((), False)), ("distclip", reduced(arguments, True))]
    timings = {}
    for name, fn in variants * 3:  # interleaved
        dist.barrier()
        samples = []
        for _ in range(calls // 3):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        timings.setdefault(name, []).extend(samples)
    if rank == 0:
        results.put({name: (statistics.median(s) * 1e6, min(s) * 1e6) for name, s in timings.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_rank, (args.nproc, port, args.calls, results), args.nproc, start_method="spawn")
    timings = results.get()
    for name, (median, best) in timings.items():
        print(f"{name:>9}: median {median:7.1f} us   min {best:7.1f} us   ({args.nproc} gloo ranks, {os.cpu_count()} cores)")
    check = timings["distclip"][0] - timings["no check"][0]
    print(f"cost of the argument check: {check:+.1f} us a call (median); distclip / minimal: "
          f"{timings['distclip'][0] / timings['minimal'][0]:.2f}")


if __name__ == "__main__":
    main()
