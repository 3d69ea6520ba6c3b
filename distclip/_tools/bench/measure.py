"""Measuring the bench: its options, the bandwidth floor, each variant's interleaved timing and peak extra
memory, the single-process run and the sharded one on gloo ranks, the records they produce, and the machine."""

import gc
import inspect
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import distclip
from distclip._clip import compiled
from distclip._tools.bench.workloads import (
    DTYPES,
    LAYOUTS,
    MAX_NORM,
    WORKLOADS,
    Pool,
    Workload,
    fsdp1_model,
    fsdp2_model,
    gradients,
    itemsize,
    leaf,
    p_name,
    p_value,
    share,
    workload,
)
from distclip._tools.ports import free_port

if TYPE_CHECKING:
    from distclip._tools.bench.report import Printer

_COLLECTIVE_TIMEOUT = timedelta(seconds=300)


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """The options of ``distclip bench``."""

    nproc: int = 2
    workloads: tuple[str, ...] = WORKLOADS
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    norm_types: tuple[str, ...] = ("2", "inf")
    repeats: int = 5
    json_path: str | None = "bench.json"
    plot_path: str | None = "bench.png"
    quick: bool = False
    fsdp1_dtypes: tuple[str, ...] = ("bf16",)
    seed: int = 0
    layouts: tuple[str, ...] = LAYOUTS

    @property
    def min_sample_s(self) -> float:
        """A sample repeats the call until it lasts this long (cheap calls are averaged over many)."""
        return 0.005 if self.quick else 0.02

    @property
    def group_budget_s(self) -> float:
        """Seconds of samples aimed at for one workload/dtype/p: expensive groups get fewer samples (at least 3)."""
        return 0.5 if self.quick else 4.0

    @property
    def bandwidth_elements(self) -> int:
        """float32 elements of the bandwidth buffer: 512 MiB (2x this machine's L3), 32 MiB with --quick."""
        return (8 << 20) if self.quick else (128 << 20)

# ------------------------------------------------------------------------------------------------ measuring


def peak_extra_bytes(fn: Callable[[], Any]) -> int | None:
    """The peak extra CPU memory of one call of ``fn``: the maximum of the running sum of the allocator's
    allocations (+) and frees (-) recorded by ``torch.profiler`` (``profile_memory=True``), in event order.
    Frees of memory allocated before the call are not recorded, so the sum starts at 0. ``None`` if the
    profiler could not say."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto (torch 2.13) writes two "USDT: ... profiler_start/stop" lines to stderr per profiled call unless
    # its log level is above 5; a value the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except Exception:  # noqa: BLE001 (a profiler without these private accessors: report nothing, not fail)
        fn()
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


@dataclass
class Bandwidth:
    """The best bandwidths seen so far, in bytes a second: ``read`` (read-only kernels), ``read_write``
    (in-place kernels, counting the tensor's bytes once); ``kernels``: each kernel's best."""

    read: float = 0.0
    read_write: float = 0.0
    kernels: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def add(self, kernel: str, nbytes: int, seconds: list[float]) -> None:
        best = nbytes / min(seconds)
        self.kernels[kernel] = max(best, self.kernels.get(kernel, 0.0))
        self.samples += len(seconds)
        if kernel in _READ_KERNELS:
            self.read = max(self.read, best)
        else:
            self.read_write = max(self.read_write, best)

    def floor(self, nbytes: int) -> float:
        """Read every byte once, then read and write it once."""
        return nbytes / self.read + nbytes / self.read_write

    def as_json(self) -> dict[str, Any]:
        return {"read_GBps": self.read / 1e9, "read_write_GBps": self.read_write / 1e9,
                "kernels_GBps": {k: v / 1e9 for k, v in self.kernels.items()}, "samples": self.samples}


_READ_KERNELS: dict[str, Callable[[Tensor], Any]] = {
    "sum": lambda b: b.sum(),
    "amax": lambda b: b.amax(),
    "vector_norm": lambda b: torch.linalg.vector_norm(b),
}
_READ_WRITE_KERNELS: dict[str, Callable[[Tensor], Any]] = {
    "mul_": lambda b: b.mul_(1.0),
    "add_": lambda b: b.add_(0.0),
}


class _Meter:
    """Times groups of variants, interleaved, with the bandwidth kernels among them.

    ``sync`` runs before each timed sample (a barrier when sharded); ``slowest`` maps a list of this rank's
    values to the elementwise max over ranks (identity on one process), so every rank agrees on every count.
    """

    BANDWIDTH_PREFIX = "bandwidth:"

    def __init__(self, config: Config, sync: Callable[[], None] = lambda: None,
                 slowest: Callable[[list[float]], list[float]] = lambda xs: xs):
        self.config, self.sync, self.slowest = config, sync, slowest
        self.buffer = Pool(12345).fill_(torch.empty(config.bandwidth_elements))
        self.bandwidth = Bandwidth()

    def settle(self, fn: Callable[[], Any], limit_s: float = 2.0) -> int:
        """Call ``fn`` until two calls in a row take times within 10% of each other (at most ``limit_s``):
        freshly allocated gradients run slower for a while on this VM, which must not land in the first group's
        samples. Every rank takes the same decisions (from the slowest rank's times). Returns the calls made."""
        previous, spent, calls = None, 0.0, 0
        while True:
            self.sync()
            start = time.perf_counter()
            fn()
            took = self.slowest([time.perf_counter() - start])[0]
            calls, spent = calls + 1, spent + took
            if (previous is not None and abs(took - previous) <= 0.1 * took) or spent >= limit_s:
                return calls
            previous = took

    def measure_bandwidth(self, kernels: Sequence[str] = (*_READ_KERNELS, *_READ_WRITE_KERNELS)) -> Bandwidth:
        """Every bandwidth kernel, interleaved, ``repeats`` samples each; returns this measurement alone (the
        best-so-far is kept in ``self.bandwidth``)."""
        self.group({}, max(3, self.config.repeats), kernels)
        return self.last

    def group(
        self, variants: dict[str, Callable[[], Any]], samples: int | None = None,
        kernels: Sequence[str] = ("sum", "mul_"),
    ) -> tuple[dict[str, list[float]], dict[str, int], dict[str, int | None]]:
        """Seconds per call of each variant, interleaved ABBA with the bandwidth ``kernels``; the calls per
        sample; the peak extra memory of each variant's first call (profiled, which also warms it up).

        A sample repeats the call until it lasts ``min_sample_s``; the number of samples is ``samples`` or, by
        default, as many as fit in ``group_budget_s``, between ``repeats`` and ``3 * repeats``: cheap groups, the
        noisiest, get more samples.
        """
        config = self.config
        all_kernels = {**_READ_KERNELS, **_READ_WRITE_KERNELS}
        runs = dict(variants)
        runs.update({self.BANDWIDTH_PREFIX + k: (lambda f=all_kernels[k]: f(self.buffer)) for k in kernels})
        names = list(runs)
        first, peaks = [], {}
        for name in names:
            self.sync()
            start = time.perf_counter()
            if name in variants:
                peak = peak_extra_bytes(runs[name])  # -1: the profiler could not say (on some rank)
                worst = int(self.slowest([-1.0 if peak is None else float(peak)])[0])
                peaks[name] = None if worst < 0 or peak is None else worst
            else:
                runs[name]()
            first.append(time.perf_counter() - start)
        first = self.slowest(first)
        calls = {name: max(1, min(2000, math.ceil(config.min_sample_s / max(t, 1e-9))))
                 for name, t in zip(names, first)}
        if samples is None:
            per_round = sum(max(t, config.min_sample_s) for t in first)
            fits = int(config.group_budget_s / per_round)
            samples = max(config.repeats, min(3 * config.repeats, fits))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(samples):
            for name in names if r % 2 == 0 else reversed(names):
                fn, n = runs[name], calls[name]
                self.sync()
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - start) / n)
        flat = self.slowest([t for name in names for t in times[name]])
        times = {name: flat[i * samples:(i + 1) * samples] for i, name in enumerate(names)}
        nbytes = self.buffer.numel() * self.buffer.element_size()
        self.last = Bandwidth()
        for name in names:
            if name.startswith(self.BANDWIDTH_PREFIX):
                seconds = times.pop(name)
                calls.pop(name)
                self.bandwidth.add(name[len(self.BANDWIDTH_PREFIX):], nbytes, seconds)
                self.last.add(name[len(self.BANDWIDTH_PREFIX):], nbytes, seconds)
        return times, calls, peaks


# -------------------------------------------------------------------------------------------------- records


def _record(
    mode: str, nproc: int, wl: Workload, dtype: str, p: float, variant: str, times: list[float] | None,
    calls: int, nbytes: int, bytes_per_rank: int, tensors_per_rank: int, floor: float, peak: int | None,
    threads: int, note: str = "", rel_error: float | None = None, layout: str | None = None,
) -> dict[str, Any]:
    """One measurement, with its group's side-by-side floor (``floor``: from the bandwidth kernels interleaved
    with it); the floor proper, from the run's best bandwidths, is set at the end (`_set_floor`)."""
    median = statistics.median(times) if times else floor
    best = min(times) if times else floor
    return {
        "mode": mode, "nproc": nproc, "workload": wl.name, "dtype": dtype, "norm_type": p_name(p),
        "layout": layout, "variant": variant, "tensors": len(wl.shapes), "tensors_per_rank": tensors_per_rank,
        "bytes": nbytes, "bytes_per_rank": bytes_per_rank, "threads_per_process": threads,
        "calls_per_sample": calls, "samples_s": times or [], "median_s": median, "min_s": best,
        "floor_s": None, "median_over_floor": None, "min_over_floor": None,
        "floor_side_s": floor, "min_over_side_floor": best / floor,
        "peak_extra_bytes": peak,
        "peak_extra_fraction": None if peak is None else peak / max(bytes_per_rank, 1),
        "rel_error": rel_error,
        "note": note,
    }


def _set_floor(record: dict[str, Any], floor: float) -> None:
    record["floor_s"] = floor
    if record["variant"] == "floor":
        record["median_s"] = record["min_s"] = floor
    record["median_over_floor"] = record["median_s"] / floor
    record["min_over_floor"] = record["min_s"] / floor


def find(records: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """The records whose fields have the values ``where`` gives."""
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def one(records: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    """The first of `find`'s records, or None."""
    found = find(records, **where)
    return found[0] if found else None


def case_of(r: dict[str, Any]) -> str:
    """The case of a record: workload, dtype, p, and the layout of a sharded one."""
    layout = f" {r['layout']}" if r.get("layout") else ""
    return f"{r['workload']} {r['dtype']} p={r['norm_type']}{layout}"


# ------------------------------------------------------------------------------------------- single process


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _single_variants(params: list[Tensor], p: float) -> dict[str, Callable[[], Any]]:
    return {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, p, foreach=None),
        "distclip": lambda: distclip.clip_grad_norm_(params, MAX_NORM, p),
        "distclip-fast": lambda: distclip.fast_clip_grad_norm_(params, MAX_NORM, p),
    }


def _relative_errors(variants: dict[str, Callable[[], Any]], grads: list[Tensor], p: float) -> dict[str, float]:
    """Each variant's returned norm against the float64 norm of the gradients it was given (one call each)."""
    errors = {}
    for name, call in variants.items():
        reference = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, p, dtype=torch.float64) for g in grads]), p).item()
        got = float(call())
        errors[name] = 0.0 if got == reference else abs(got - reference) / abs(reference)
    return errors


def fused_folding_available() -> bool:
    """Whether distclip can fold the clip into torch's fused optimizers (``GradClipper(..., fused=True)``)."""
    clipper = getattr(distclip, "GradClipper", None)
    return clipper is not None and "fused" in inspect.signature(clipper).parameters


def run_single(config: Config, out: "Printer") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    threads = usable_cores()
    torch.set_num_threads(threads)
    meter = _Meter(config)
    out.bandwidth(f"single process, {threads} threads, at the start", meter.measure_bandwidth())
    records: list[dict[str, Any]] = []
    out.line(f"measuring: single process, {threads} threads")
    for name in config.workloads:
        wl = workload(name, config.quick, config.seed)
        for dtype_name in config.dtypes:
            dtype = DTYPES[dtype_name]
            grads = gradients(wl, dtype, config.seed)
            params = [leaf(g) for g in grads]
            nbytes = wl.nbytes(dtype)
            meter.settle(lambda params=params: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, 2.0))
            for norm_type in config.norm_types:
                p = p_value(norm_type)
                variants = _single_variants(params, p)
                times, calls, peaks = meter.group(variants)
                floor = meter.last.floor(nbytes)
                errors = _relative_errors(variants, grads, p)
                group = [_record("single", 1, wl, dtype_name, p, variant, times[variant], calls[variant], nbytes,
                                 nbytes, len(wl.shapes), floor, peaks[variant], threads, rel_error=errors[variant])
                         for variant in variants]
                group.append(_record("single", 1, wl, dtype_name, p, "floor", None, 0, nbytes, nbytes,
                                     len(wl.shapes), floor, None, threads))
                out.group(group)
                records += group
            del grads, params
            gc.collect()
    if fused_folding_available() and "gpt2" in config.workloads and "fp32" in config.dtypes:
        records += _run_fused(config, meter, threads, out)
    # Measured again at the end: the floor uses the best bandwidth of the whole run (start, every group, end),
    # so a busy moment cannot flatter the ratios.
    out.bandwidth(f"single process, {threads} threads, at the end", meter.measure_bandwidth())
    out.bandwidth(f"single process, {threads} threads, best of the run: the floor", meter.bandwidth)
    for record in records:
        if record["mode"] == "single":
            _set_floor(record, meter.bandwidth.floor(record["bytes_per_rank"]))
    return records, {"threads": threads, **meter.bandwidth.as_json()}


def _run_fused(config: Config, meter: _Meter, threads: int, out: "Printer") -> list[dict[str, Any]]:
    """Clip + fused AdamW step against the fused step alone, on GPT-2 fp32 (real parameters)."""
    wl = workload("gpt2", config.quick, config.seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in wl.shapes]
    for param, grad in zip(params, gradients(wl, torch.float32, config.seed)):
        param.grad = grad
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    clipper = distclip.GradClipper(params, MAX_NORM, optimizer=optimizer, fused=True)

    def folded():
        clipper.step(clipper.clip_())

    def unfolded():
        distclip.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()

    variants = {"adamw-fused": optimizer.step, "clip+adamw-fused": unfolded, "folded-clip+adamw-fused": folded}
    for fn in variants.values():  # AdamW allocates its state on the first step: not part of any variant's cost
        fn()
    times, calls, peaks = meter.group(variants)
    nbytes = wl.nbytes(torch.float32)
    step = times["adamw-fused"]
    records = []
    for variant in variants:
        record = _record("fused", 1, wl, "fp32", 2.0, variant, times[variant], calls[variant], nbytes, nbytes,
                         len(wl.shapes), statistics.median(step), peaks[variant], threads,
                         note="floor_s: the fused AdamW step alone (median); ratios: median over its median, "
                              "min over its min")
        record.update(floor_s=statistics.median(step), median_over_floor=record["median_s"] / statistics.median(step),
                      min_over_floor=record["min_s"] / min(step))
        records.append(record)
    out.group(records)
    return records


# --------------------------------------------------------------------------------------------------- sharded


def run_sharded(config: Config, out: "Printer") -> tuple[list[dict[str, Any]], dict[str, Any]] | str:
    """Spawn ``config.nproc`` gloo ranks; rank 0 prints to ``out`` as it goes. The records and the ranks'
    machine details, or a one-line error."""
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_sharded_rank, (free_port(), config, out, results), config.nproc)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        last_line = str(err).strip().splitlines()[-1]
        return f"rank {err.error_index} failed: {last_line}"
    return results.get()


def _sharded_rank(rank: int, port: int, config: Config, out: "Printer", results) -> None:
    threads = max(1, usable_cores() // config.nproc)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.nproc, timeout=_COLLECTIVE_TIMEOUT)
    try:
        records, machine = _sharded_suite(config, rank, threads, out.on_rank(rank))
        if rank == 0:
            results.put((records, machine))
    finally:
        dist.destroy_process_group()


def _local_numel(t: Tensor) -> int:
    """Elements this rank holds of ``t`` (a DTensor's local shard)."""
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def _max_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _naive_sharded(params: list[Tensor], p: float) -> Tensor:
    """A hand-written sharded clip: torch's local norm, one all_reduce, torch's scaling."""
    local = torch.nn.utils.get_total_norm([q.grad for q in params], p).to(torch.float32)
    if math.isinf(p):
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        total = local
    else:
        power = local.pow(p)
        dist.all_reduce(power)
        total = power.pow(1.0 / p)
    torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, total)
    return total


def _sharded_variants(
    params: list[Tensor], fsdp: nn.Module | None, fsdp2: nn.Module | None, p: float, empty: bool
) -> dict[str, Callable[[], Any]]:
    """The variants of one layout: ``params`` plain pieces over the world, or (``fsdp2``) the DTensor
    parameters of an FSDP2 model; ``fsdp``: the FSDP1 model of the same shapes, measured beside the views."""
    world = dist.group.WORLD
    variants: dict[str, Callable[[], Any]] = {}
    if fsdp2 is None:
        variants["distclip-sharded"] = lambda: distclip.clip_grad_norm_(params, MAX_NORM, p, group=world)
        if not math.isinf(p):  # torch's inf-norm kernels take up to a second a call here, and no target needs them
            variants["naive-sharded"] = lambda: _naive_sharded(params, p)
    else:
        variants["distclip-sharded"] = lambda: distclip.clip_grad_norm_(params, MAX_NORM, p)
        variants["distclip-module"] = lambda: distclip.clip_module_grad_norm_(fsdp2, MAX_NORM, p)
        if not math.isinf(p):
            variants["torch-dtensor"] = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, p)
    if fsdp is not None:
        variants["fsdp1"] = lambda: fsdp.clip_grad_norm_(MAX_NORM, p)
        variants["distclip-fsdp1"] = lambda: distclip.clip_module_grad_norm_(fsdp, MAX_NORM, p)
    if empty:
        variants["distclip-sharded-empty"] = lambda: distclip.clip_grad_norm_([], MAX_NORM, p, group=world)
    return variants


def _sharded_suite(
    config: Config, rank: int, threads: int, out: "Printer"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    world = config.nproc
    meter = _Meter(config, dist.barrier, _max_over_ranks)
    where = f"sharded, {world} gloo ranks x {threads} thread(s), every rank at once, the slowest rank"
    out.bandwidth(where + ", at the start", meter.measure_bandwidth())
    out.line(f"measuring: sharded, {world} gloo ranks x {threads} thread(s)")
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in config.workloads:
        wl = workload(name, config.quick, config.seed)
        for dtype_name in config.dtypes:
            dtype = DTYPES[dtype_name]
            fsdp = None
            if dtype_name in config.fsdp1_dtypes:
                try:
                    fsdp = fsdp1_model(wl, dtype, config.seed)
                except Exception as err:  # noqa: BLE001 (reported, and the other variants still run)
                    notes.append(f"{wl.name} {dtype_name}: FSDP1 could not be built ({err!r})")
            for layout in config.layouts:
                fsdp2 = fsdp2_model(wl, dtype, config.seed) if layout == "fsdp2" else None
                params = list(fsdp2.parameters()) if fsdp2 is not None else share(
                    wl, dtype, rank, world, config.seed, layout).params
                numel = sum(_local_numel(q.grad) for q in params)
                tensors_per_rank = int(_max_over_ranks([len(params)])[0])
                bytes_per_rank = int(_max_over_ranks([numel * itemsize(dtype)])[0])
                meter.settle(lambda pieces=params: distclip.clip_grad_norm_(pieces, MAX_NORM,
                                                                            group=dist.group.WORLD))
                for norm_type in config.norm_types:
                    p = p_value(norm_type)
                    variants = _sharded_variants(params, fsdp if layout == "views" else None, fsdp2, p,
                                                 empty=wl.name == "tiny")
                    times, calls, peaks = meter.group(variants)
                    floor = meter.last.floor(bytes_per_rank)
                    group = [_record("sharded", world, wl, dtype_name, p, variant, times[variant], calls[variant],
                                     wl.nbytes(dtype), bytes_per_rank, tensors_per_rank, floor, peaks[variant],
                                     threads, layout=layout)
                             for variant in variants]
                    group.append(_record("sharded", world, wl, dtype_name, p, "floor", None, 0, wl.nbytes(dtype),
                                         bytes_per_rank, tensors_per_rank, floor, None, threads, layout=layout))
                    out.group(group)
                    records += group
                del params, fsdp2
                gc.collect()
            del fsdp
            gc.collect()
    for note in notes:
        out.line(note)
    out.bandwidth(where + ", at the end", meter.measure_bandwidth())
    out.bandwidth(where + ", best of the run: the floor", meter.bandwidth)
    for record in records:
        _set_floor(record, meter.bandwidth.floor(record["bytes_per_rank"]))
    compiles = compiled.compile_seconds()
    names = [d for d in config.dtypes if DTYPES[d] in compiled.DTYPES]
    slowest = _max_over_ranks([compiles.get(DTYPES[d], -1.0) for d in names]) if names else []
    compile_s = {d: (s if s >= 0 else None) for d, s in zip(names, slowest)}
    if compile_s:
        out.line(compile_line(compile_s))
    return records, {"threads_per_rank": threads, **meter.bandwidth.as_json(), "notes": notes,
                     "compile_s": compile_s}


def compile_line(compile_s: dict[str, float | None]) -> str:
    """What the compiled bfloat16/float16 norm kernel cost this run: its first call on each rank, by dtype (None:
    not compiled)."""
    said = [f"{d} {t:.1f} s" if t is not None else f"{d} not compiled (switched off or failed: the eager path)"
            for d, t in compile_s.items()]
    return ("compiled bf16/fp16 CPU 2-norm kernel, its first call in a rank's process (the compile; the slowest "
            f"rank): {', '.join(said)}")


# ------------------------------------------------------------------------------------------------ the machine


def distclip_state() -> dict[str, Any]:
    """distclip's version, and where it is a git checkout, its commit and whether its files differ from it."""
    import subprocess

    state: dict[str, Any] = {"version": getattr(distclip, "__version__", "?")}
    here = os.path.dirname(os.path.abspath(distclip.__file__))
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout

        state["commit"] = git("rev-parse", "HEAD").strip()
        state["modified"] = [line[3:] for line in git("status", "--porcelain", "--", ".").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def allocator() -> str:
    """The C allocator of this process and its ranks (which inherit the environment): a library preloaded with
    ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), else the C library's malloc. Per-tensor host costs depend on
    it: glibc's malloc slows torch's per-tensor grouping once a large model was built and freed
    (docs/benchmarks.md)."""
    names = [os.path.basename(path) for path in re.split(r"[: ]", os.environ.get("LD_PRELOAD", ""))]
    preloaded = [name for name in names if "alloc" in name]
    return ", ".join(preloaded) if preloaded else "the C library's malloc"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
