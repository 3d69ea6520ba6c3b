"""GPU check, part 3: how close clipping sits to the HBM floor on one GPU, written into docs/benchmarks.md.

``distclip bench`` measures on the CPU only (gloo ranks, host timers, the CPU memory profiler), so this is the
GPU counterpart of its single-process and sharded rows, on the same workloads (``distclip._tools.bench.workloads``):

- the floor: what a clip must move, the gradients read once (the norm) and read and written once (the
  scaling), at the bandwidths of a read kernel (``sum``) and a read-write kernel (``mul_``) over a 1 GiB buffer
  measured in the same run (the best of the run);
- variants: ``torch.nn.utils.clip_grad_norm_`` (foreach), ``distclip.clip_grad_norm_`` (one process: torch's
  kernels), ``distclip.clip_grad_norm_(group=)`` on a one-rank NCCL group (sharded: float64 norm kernels, one
  ``all_reduce``, and the argument check's host read every call) and ``GradClipper.clip_()`` on the same group
  (sharded, no host synchronisation after the first call);
- times from CUDA events, each sample a run of calls lasting at least 5 ms, samples interleaved across the
  variants; the median and the best over ``--repeats`` samples, divided by the floor.

``--device cpu`` (the dry run of ``gpu_check.sh``): the same code on the CPU with a one-rank gloo group, the
``--quick`` sizes of the workloads and a 32 MiB buffer; the numbers mean nothing, the table's form is checked.

With ``--docs PATH`` the results replace what lies between ``<!-- gpu-check:begin -->`` and
``<!-- gpu-check:end -->`` in PATH; ``--json PATH`` writes every measurement.
"""

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import distclip
from distclip._tools.bench.workloads import workload
from distclip._tools.ports import free_port

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLE_S = 0.005
MAX_NORM = 1.0


class Timer:
    """Seconds per call of ``fn``: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, calls: int) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / calls
        start_s = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start_s) / calls

    def calls_for(self, fn) -> int:
        """How many calls one sample needs to last ``SAMPLE_S`` (after a warm-up)."""
        for _ in range(3):
            fn()
        one = self.per_call(fn, 1)
        return max(1, math.ceil(SAMPLE_S / max(one, 1e-9)))


def bandwidths(timer: Timer, elements: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """(read, read-write) bytes per second: ``sum`` reads the buffer once, ``mul_(-1)`` reads and writes it."""
    buffer = torch.ones(elements, device=device)
    nbytes = buffer.numel() * buffer.element_size()
    read = lambda: buffer.sum()
    write = lambda: buffer.mul_(-1.0)
    best_read = min(timer.per_call(read, timer.calls_for(read)) for _ in range(repeats))
    best_rw = min(timer.per_call(write, timer.calls_for(write)) for _ in range(repeats))
    return nbytes / best_read, 2 * nbytes / best_rw


def variants(params: list[torch.Tensor], p: float) -> dict:
    clipper = distclip.GradClipper(params, MAX_NORM, p, group=dist.group.WORLD)
    clipper.clip_()  # its one argument check, outside the timing
    return {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, p, foreach=True),
        "distclip": lambda: distclip.clip_grad_norm_(params, MAX_NORM, p),
        "distclip sharded": lambda: distclip.clip_grad_norm_(params, MAX_NORM, p, group=dist.group.WORLD),
        "GradClipper sharded": clipper.clip_,
    }


def run(args) -> dict:
    device = torch.device(args.device)
    quick = device.type == "cpu"
    timer = Timer(device)
    read_bw, rw_bw = bandwidths(timer, (8 << 20) if quick else (256 << 20), device, args.repeats)
    records = []
    for name in args.workloads.split(","):
        wl = workload(name, quick=quick)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device=device).manual_seed(0)
            params = []
            for shape in wl.shapes:
                param = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                param.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
                params.append(param)
            nbytes = wl.nbytes(dtype)
            floor = nbytes / read_bw + 2 * nbytes / rw_bw
            for norm_type in args.norm_types.split(","):
                p = float(norm_type)
                fns = variants(params, p)
                calls = {v: timer.calls_for(fn) for v, fn in fns.items()}
                times = {v: [] for v in fns}
                for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
                    for v, fn in fns.items():
                        times[v].append(timer.per_call(fn, calls[v]))
                for v, ts in times.items():
                    median = statistics.median(ts)
                    records.append({"workload": name, "title": wl.title, "dtype": dtype_name, "p": norm_type,
                                    "variant": v, "tensors": len(wl.shapes), "bytes": nbytes, "median_s": median,
                                    "min_s": min(ts), "floor_s": floor, "median_over_floor": median / floor,
                                    "min_over_floor": min(ts) / floor})
                    print(f"{name:6} {dtype_name} p={norm_type:3} {v:20} median {median * 1e3:9.3f} ms  "
                          f"floor {floor * 1e3:8.3f} ms  x{median / floor:6.2f}", flush=True)
            del params
    return {"device": _device_name(device), "torch": torch.__version__, "commit": _commit(), "date": _now(),
            "read_bandwidth": read_bw, "rw_bandwidth": rw_bw, "records": records}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def markdown(result: dict, dry_run: bool) -> str:
    lines = [
        (f"Run of `benchmarks/gpu_check.sh` at {result['commit']}, {result['date']}, on {result['device']}, "
         f"torch {result['torch']}: read bandwidth {result['read_bandwidth'] / 1e9:.0f} GB/s, read-write "
         f"{result['rw_bandwidth'] / 1e9:.0f} GB/s (the floor's)."),
    ]
    if dry_run:
        lines.append("")
        lines.append("(A dry run on the CPU with the quick sizes: the form of this section, not numbers to read.)")
    lines += ["", "| workload | dtype | p | variant | median (ms) | floor (ms) | median / floor | best / floor |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["records"]:
        lines.append(f"| {r['title']} | {r['dtype']} | {r['p']} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['floor_s'] * 1e3:.3f} | {r['median_over_floor']:.2f} | {r['min_over_floor']:.2f} |")
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"gpu_bench: {path} has no {BEGIN} ... {END} block to write into")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{section}\n{END}", text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--workloads", default="gpt2,small,llama")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--norm-types", default="2,inf")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default="", help="where to write every measurement ('' for none)")
    parser.add_argument("--docs", default="", help="the markdown file whose gpu-check block to replace")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}", timeout=timedelta(seconds=60))
    try:
        result = run(args)
    finally:
        dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.docs:
        write_docs(Path(args.docs), markdown(result, dry_run=device.type == "cpu"))
        print(f"gpu_bench: wrote {len(result['records'])} rows into {args.docs}")


if __name__ == "__main__":
    main()
