"""``distclip bench``: how close clipping sits to the memory-bandwidth floor (issue 8, items 1 and 7).

A clip must read every gradient once (the norm) and read and write it once (the scaling). The *floor* of a
workload is therefore ``bytes / read_bandwidth + bytes / read_write_bandwidth``, with both bandwidths measured
in the same run on a buffer larger than the last-level cache (the fastest of a few read-only kernels, and of a
few in-place kernels). Every variant is timed against it, interleaved with the others (ABBA...), and reported
as a median and a minimum over its samples; a sample repeats the call until it lasts at least a few ms.

Single process (``torch.set_num_threads`` = the usable cores):

- ``torch``: ``torch.nn.utils.clip_grad_norm_(params, max_norm, p, foreach=None)``;
- ``distclip``: ``distclip.clip_grad_norm_(params, max_norm, p)`` (parity mode, ``group=None``).

Sharded (``--nproc N >= 2``, N gloo ranks on 127.0.0.1, each holding a contiguous 1/N of the workload's flat
element range; a sample is timed after a barrier and is the slowest rank's), on every layout of ``--layouts``
(`LAYOUTS`): ``views``, the pieces as consecutive views of one per-rank buffer (ZeRO partitions, FSDP1 flat
shards); ``separate``, one allocation per piece; ``aligned``, views of one buffer, each 64-byte aligned after a
64-byte gap (FSDP2 local shards, per-parameter ZeRO-3 pieces); ``fsdp2``, a real ``fully_shard`` model of the
workload's shapes (one unit per layer), whose DTensor gradients are clipped by torch's own clip
(``torch-dtensor``), ``distclip.clip_grad_norm_(model.parameters(), ...)`` (``distclip-sharded``) and
``distclip.clip_module_grad_norm_(model, ...)`` (``distclip-module``):

- ``distclip-sharded``: ``distclip.clip_grad_norm_(pieces, max_norm, p, group=WORLD)``;
- ``naive-sharded``: torch's local ``get_total_norm``, one ``all_reduce`` of its p-th power (max for inf),
  ``clip_grads_with_norm_``: what one writes by hand;
- ``fsdp1`` / ``distclip-fsdp1``: the same parameter shapes in an FSDP1 ``FullyShardedDataParallel`` model
  (FULL_SHARD, one unit per transformer layer, flat-parameter gradients set at random), clipped by
  ``FullyShardedDataParallel.clip_grad_norm_`` and by ``distclip.clip_module_grad_norm_`` (the README's
  replacement for it), on the same flat shards (measured once, beside the ``views`` layout);
- ``distclip-sharded-empty`` (2000-tiny workload only): the same call with no tensors, the fixed cost of a
  sharded call (the collective), which the per-tensor target subtracts.

Memory (item 7): one call of each variant runs under ``torch.profiler`` with ``profile_memory=True``; the peak
of the running sum of the CPU allocator's allocations and frees, in event order, is the variant's peak extra
memory (what the call allocated beyond what existed before it), reported in bytes and as a fraction of the
gradient bytes (the largest over ranks when sharded).

Run: ``distclip bench`` (``--help`` for the options); the reading guide is ``docs/benchmarks.md``.
"""

import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import distclip

WORKLOADS = ("gpt2", "small", "tiny", "huge", "llama")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a rank's gradient pieces lie in memory in the sharded runs (see `_share` and `_fsdp2_model`).
LAYOUTS = ("views", "separate", "aligned", "fsdp2")
# Workloads that are models (for the FSDP1 target: "bf16 models").
MODEL_WORKLOADS = ("gpt2", "llama")
_COLLECTIVE_TIMEOUT = timedelta(seconds=300)
_SCALE = 1e-3  # gradients are N(0, 1e-3): every element a normal float, far from overflow and from denormals
_MAX_NORM = 1e-2  # below every workload's first norm, so the first call clips (coef < 1)
# Peak extra memory allowed to a distclip clip (item 7): O(number of tensors), no gradient-sized temporary.
# The constant covers the 1 MiB float32 buffer of a sharded CPU norm and an inf norm's batch of small tensors.
MEMORY_CONSTANT_BYTES = 4 << 20
MEMORY_BYTES_PER_TENSOR = 1024


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


@dataclass(frozen=True)
class Workload:
    """A list of gradient shapes; ``blocks``: index ranges that FSDP1 wraps as units of their own (layers)."""

    name: str
    title: str
    shapes: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * _itemsize(dtype)


def workload(name: str, quick: bool = False, seed: int = 0) -> Workload:
    """The workload ``name`` (see `WORKLOADS`); ``quick``: the same structure, far fewer elements."""
    if name == "gpt2":
        if quick:
            return _gpt2(vocab=2048, ctx=256, d=96, layers=12, title="GPT-2 small structure (quick sizes)")
        return _gpt2(vocab=50257, ctx=1024, d=768, layers=12, title="GPT-2 small")
    if name == "small":
        count = 200 if quick else 2000
        sizes = torch.randint(1024, 16384 + 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
        return Workload("small", f"{count} small tensors (1K-16K elements)", tuple((n,) for n in sizes))
    if name == "tiny":
        count = 200 if quick else 2000
        return Workload("tiny", f"{count} tiny tensors (16 elements)", ((16,),) * count)
    if name == "huge":
        n = (1 << 20) if quick else (64 << 20)
        return Workload("huge", f"one huge tensor ({n >> 20}M elements)", ((n,),))
    if name == "llama":
        if quick:
            return _llama(dim=128, hidden=352, layers=2, vocab=1000, title="Llama-style stack (quick sizes)")
        return _llama(dim=2048, hidden=5632, layers=4, vocab=32000, title="Llama-style stack (dim 2048, 4 layers)")
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def _gpt2(vocab: int, ctx: int, d: int, layers: int, title: str) -> Workload:
    """GPT-2's 148 tensors (12 layers): wte, wpe, per layer ln_1 w/b, attn.c_attn w/b, attn.c_proj w/b,
    ln_2 w/b, mlp.c_fc w/b, mlp.c_proj w/b; ln_f w/b."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    blocks = []
    for _ in range(layers):
        start = len(shapes)
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        blocks.append((start, len(shapes)))
    shapes += [(d,), (d,)]
    return Workload("gpt2", title, tuple(shapes), tuple(blocks))


def _llama(dim: int, hidden: int, layers: int, vocab: int, title: str) -> Workload:
    """Embedding; per layer wq, wk, wv, wo (dim x dim), w1, w3 (dim x hidden), w2 (hidden x dim), two norms;
    final norm; output (vocab x dim)."""
    shapes: list[tuple[int, ...]] = [(vocab, dim)]
    blocks = []
    for _ in range(layers):
        start = len(shapes)
        shapes += [(dim, dim)] * 4 + [(dim, hidden), (dim, hidden), (hidden, dim), (dim,), (dim,)]
        blocks.append((start, len(shapes)))
    shapes += [(dim,), (vocab, dim)]
    return Workload("llama", title, tuple(shapes), tuple(blocks))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _p_value(norm_type: str) -> float:
    return float(norm_type)


def _p_name(p: float) -> str:
    return "inf" if p == math.inf else ("-inf" if p == -math.inf else f"{p:g}")


# --------------------------------------------------------------------------------------------------- tensors


class _Pool:
    """A 1 Mi-element block of N(0, _SCALE) values, copied cyclically into gradients: filling gigabytes at
    memory speed instead of at the random generator's speed (norms do not care that values repeat)."""

    def __init__(self, seed: int):
        self.values = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)).mul_(_SCALE)
        self.offset = 0

    def fill_(self, tensor: Tensor) -> Tensor:
        flat = tensor.view(-1)
        n, size = flat.numel(), self.values.numel()
        done = 0
        while done < n:
            start = self.offset % size
            take = min(n - done, size - start)
            flat[done:done + take].copy_(self.values[start:start + take])
            done += take
            self.offset += take + 7919  # a different phase for the next tensor
        return tensor


def _leaf(grad: Tensor) -> Tensor:
    """A parameter for ``grad`` that holds no memory of its own: a broadcast 0-d tensor of its shape."""
    param = torch.zeros((), dtype=grad.dtype).expand(grad.shape)
    param.grad = grad
    return param


def _gradients(wl: Workload, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """One separately allocated tensor per shape, as a model's ``.grad``s are."""
    pool = _Pool(seed)
    return [pool.fill_(torch.empty(shape, dtype=dtype)) for shape in wl.shapes]


@dataclass
class _Share:
    """A rank's contiguous 1/N of the workload's flat element range, one tensor per piece, laid out as
    ``layout`` says: ``views``, consecutive views of one buffer (ZeRO partitions, FSDP1 flat shards);
    ``separate``, one allocation per piece (a model's own ``.grad``s); ``aligned``, views of one buffer that
    each start on a 64-byte boundary after a 64-byte gap, so that no two are consecutive (FSDP2 local shards,
    per-parameter ZeRO-3 pieces)."""

    params: list[Tensor]
    numel: int


_ALIGN = 64  # bytes


def _share(wl: Workload, dtype: torch.dtype, rank: int, world: int, seed: int, layout: str = "views") -> _Share:
    total = wl.numel
    lo, hi = total * rank // world, total * (rank + 1) // world
    sizes, offset = [], 0
    for shape in wl.shapes:
        n = math.prod(shape)
        a, b = max(offset, lo), min(offset + n, hi)
        if a < b:
            sizes.append(b - a)
        offset += n
    pool = _Pool(seed + 1 + rank)
    if layout == "separate":
        return _Share([_leaf(pool.fill_(torch.empty(n, dtype=dtype))) for n in sizes], hi - lo)
    align = _ALIGN // _itemsize(dtype)
    starts, end = [], 0
    for n in sizes:
        start = end if layout == "views" else -(-end // align) * align + align
        starts.append(start)
        end = start + n
    buffer = pool.fill_(torch.empty(end, dtype=dtype))
    return _Share([_leaf(buffer[a:a + n]) for a, n in zip(starts, sizes)], hi - lo)


class _Holder(nn.Module):
    """Parameters of the given shapes (uninitialised: FSDP1 only flattens them; their gradients are set)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype):
        super().__init__()
        self.tensors = nn.ParameterList([nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes])


def _fsdp1_model(wl: Workload, dtype: torch.dtype, seed: int) -> nn.Module:
    """The workload as an FSDP1 model: FULL_SHARD, one unit per block (layer) and one for the other tensors,
    ``use_orig_params=False``; every flat parameter's ``.grad`` (this rank's shard) set at random."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    in_blocks = {i for lo, hi in wl.blocks for i in range(lo, hi)}
    model = nn.Module()
    model.blocks = nn.ModuleList([_Holder(wl.shapes[lo:hi], dtype) for lo, hi in wl.blocks])
    model.rest = _Holder([s for i, s in enumerate(wl.shapes) if i not in in_blocks], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdp = FullyShardedDataParallel(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({_Holder}),
            device_id=torch.device("cpu"),
            use_orig_params=False,
        )
    pool = _Pool(seed + 1000 + dist.get_rank())
    for flat in fsdp.parameters():
        flat.grad = pool.fill_(torch.empty_like(flat))
    fsdp.clip_grad_norm_(_MAX_NORM)  # FSDP1's lazy initialisation, outside every measurement
    return fsdp


def _fsdp2_model(wl: Workload, dtype: torch.dtype, seed: int) -> nn.Module:
    """The workload as an FSDP2 model: ``fully_shard`` on each block (layer), on the other tensors' holder and
    on the root, over the world; every parameter's ``.grad`` a DTensor laid out as the parameter, its local
    shard (one allocation each, as backward leaves them) set at random."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    in_blocks = {i for lo, hi in wl.blocks for i in range(lo, hi)}
    model = nn.Module()
    model.blocks = nn.ModuleList([_Holder(wl.shapes[lo:hi], dtype) for lo, hi in wl.blocks])
    model.rest = _Holder([s for i, s in enumerate(wl.shapes) if i not in in_blocks], dtype)
    for holder in [*model.blocks, model.rest]:
        fully_shard(holder)
    fully_shard(model)
    pool = _Pool(seed + 2000 + dist.get_rank())
    for param in model.parameters():
        local = pool.fill_(torch.empty_like(param.to_local()))
        param.grad = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())
    return model


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
    except Exception:  # a profiler without these private accessors: report nothing rather than fail the run
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
        self.buffer = _Pool(12345).fill_(torch.empty(config.bandwidth_elements))
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
        "mode": mode, "nproc": nproc, "workload": wl.name, "dtype": dtype, "norm_type": _p_name(p),
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


# ------------------------------------------------------------------------------------------- single process


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _single_variants(params: list[Tensor], p: float) -> dict[str, Callable[[], Any]]:
    return {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, _MAX_NORM, p, foreach=None),
        "distclip": lambda: distclip.clip_grad_norm_(params, _MAX_NORM, p),
        "distclip-fast": lambda: distclip.fast_clip_grad_norm_(params, _MAX_NORM, p),
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


def _run_single(config: Config, out: "_Printer") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    threads = _usable_cores()
    torch.set_num_threads(threads)
    meter = _Meter(config)
    out.bandwidth(f"single process, {threads} threads, at the start", meter.measure_bandwidth())
    records: list[dict[str, Any]] = []
    out.line(f"measuring: single process, {threads} threads")
    for name in config.workloads:
        wl = workload(name, config.quick, config.seed)
        for dtype_name in config.dtypes:
            dtype = DTYPES[dtype_name]
            grads = _gradients(wl, dtype, config.seed)
            params = [_leaf(g) for g in grads]
            nbytes = wl.nbytes(dtype)
            meter.settle(lambda params=params: torch.nn.utils.clip_grad_norm_(params, _MAX_NORM, 2.0))
            for norm_type in config.norm_types:
                p = _p_value(norm_type)
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


def _run_fused(config: Config, meter: _Meter, threads: int, out: "_Printer") -> list[dict[str, Any]]:
    """Item 5: clip + fused AdamW step against the fused step alone, on GPT-2 fp32 (real parameters)."""
    wl = workload("gpt2", config.quick, config.seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in wl.shapes]
    for param, grad in zip(params, _gradients(wl, torch.float32, config.seed)):
        param.grad = grad
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    clipper = distclip.GradClipper(params, _MAX_NORM, optimizer=optimizer, fused=True)

    def folded():
        clipper.step(clipper.clip_())

    def unfolded():
        distclip.clip_grad_norm_(params, _MAX_NORM)
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


def _run_sharded(config: Config) -> tuple[list[dict[str, Any]], dict[str, Any]] | str:
    """Spawn ``config.nproc`` gloo ranks; rank 0 prints as it goes. The records and the ranks' machine
    details, or a one-line error."""
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_sharded_rank, (_free_port(), config, results), config.nproc)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        last_line = str(err).strip().splitlines()[-1]
        return f"rank {err.error_index} failed: {last_line}"
    return results.get()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_rank(rank: int, port: int, config: Config, results) -> None:
    threads = max(1, _usable_cores() // config.nproc)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.nproc, timeout=_COLLECTIVE_TIMEOUT)
    try:
        records, machine = _sharded_suite(config, rank, threads)
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
    torch.nn.utils.clip_grads_with_norm_(params, _MAX_NORM, total)
    return total


def _sharded_variants(
    params: list[Tensor], fsdp: nn.Module | None, fsdp2: nn.Module | None, p: float, empty: bool
) -> dict[str, Callable[[], Any]]:
    """The variants of one layout: ``params`` plain pieces over the world, or (``fsdp2``) the DTensor
    parameters of an FSDP2 model; ``fsdp``: the FSDP1 model of the same shapes, measured beside the views."""
    world = dist.group.WORLD
    variants: dict[str, Callable[[], Any]] = {}
    if fsdp2 is None:
        variants["distclip-sharded"] = lambda: distclip.clip_grad_norm_(params, _MAX_NORM, p, group=world)
        if not math.isinf(p):  # torch's inf-norm kernels take up to a second a call here, and no target needs them
            variants["naive-sharded"] = lambda: _naive_sharded(params, p)
    else:
        variants["distclip-sharded"] = lambda: distclip.clip_grad_norm_(params, _MAX_NORM, p)
        variants["distclip-module"] = lambda: distclip.clip_module_grad_norm_(fsdp2, _MAX_NORM, p)
        if not math.isinf(p):
            variants["torch-dtensor"] = lambda: torch.nn.utils.clip_grad_norm_(params, _MAX_NORM, p)
    if fsdp is not None:
        variants["fsdp1"] = lambda: fsdp.clip_grad_norm_(_MAX_NORM, p)
        variants["distclip-fsdp1"] = lambda: distclip.clip_module_grad_norm_(fsdp, _MAX_NORM, p)
    if empty:
        variants["distclip-sharded-empty"] = lambda: distclip.clip_grad_norm_([], _MAX_NORM, p, group=world)
    return variants


def _sharded_suite(config: Config, rank: int, threads: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    world = config.nproc
    out = _Printer(enabled=rank == 0)
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
                    fsdp = _fsdp1_model(wl, dtype, config.seed)
                except Exception as err:  # noqa: BLE001: reported, and the other variants still run
                    notes.append(f"{wl.name} {dtype_name}: FSDP1 could not be built ({err!r})")
            for layout in config.layouts:
                fsdp2 = _fsdp2_model(wl, dtype, config.seed) if layout == "fsdp2" else None
                params = list(fsdp2.parameters()) if fsdp2 is not None else _share(
                    wl, dtype, rank, world, config.seed, layout).params
                numel = sum(_local_numel(q.grad) for q in params)
                tensors_per_rank = int(_max_over_ranks([len(params)])[0])
                bytes_per_rank = int(_max_over_ranks([numel * _itemsize(dtype)])[0])
                meter.settle(lambda pieces=params: distclip.clip_grad_norm_(pieces, _MAX_NORM,
                                                                            group=dist.group.WORLD))
                for norm_type in config.norm_types:
                    p = _p_value(norm_type)
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
    return records, {"threads_per_rank": threads, **meter.bandwidth.as_json(), "notes": notes}


# ----------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One target of issue 8: ``status`` PASS, FAIL or n/a, ``measured`` the ratio (or value) it is judged on."""

    key: str
    item: str
    text: str
    status: str
    measured: float | None
    detail: str

    def line(self) -> str:
        return f"[{self.status:<4}] {self.key}: {self.text}: {self.detail}"


def _find(records: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def _one(records: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    found = _find(records, **where)
    return found[0] if found else None


def _where(r: dict[str, Any]) -> str:
    """The case of a record: workload, dtype, p, and the layout of a sharded one."""
    layout = f" {r['layout']}" if r.get("layout") else ""
    return f"{r['workload']} {r['dtype']} p={r['norm_type']}{layout}"


def targets(records: list[dict[str, Any]], config: Config) -> list[Target]:
    """Every target of issue 8 with its measured ratio and whether it holds (judged on minimums: on a shared
    machine noise only ever adds time; the medians are printed beside them)."""
    found: list[Target] = []
    sharded_hint = "n/a: run with --nproc 2 (or more)" if config.nproc < 2 else None

    # 2. Parity mode costs at most 3% over torch, on every workload.
    pairs = []
    for d in _find(records, mode="single", variant="distclip"):
        t = _one(records, mode="single", variant="torch", workload=d["workload"], dtype=d["dtype"],
                 norm_type=d["norm_type"])
        if t:
            pairs.append((d["min_s"] / t["min_s"], _paired_ratio(d, t), d))
    if pairs:
        worst = max(pairs, key=lambda x: x[0])
        worst_paired = max(pairs, key=lambda x: x[1])
        found.append(Target("parity", "2", "distclip (group=None) <= 1.03x torch on every workload",
                            _verdict(worst[0] <= 1.03), worst[0],
                            f"worst {worst[0]:.3f}x ({_where(worst[2])}) on minimums; worst median of the "
                            f"paired samples' ratios {worst_paired[1]:.3f}x ({_where(worst_paired[2])}); "
                            f"{len(pairs)} configurations"))
    else:
        found.append(Target("parity", "2", "distclip (group=None) <= 1.03x torch on every workload", "n/a", None,
                            "n/a: no single-process measurement"))

    # 3a. Sharded GPT-2 fp32 <= 1.1x the floor, on every layout.
    text = "sharded GPT-2 fp32 (p=2) <= 1.1x the floor, on every layout"
    judged = _find(records, mode="sharded", variant="distclip-sharded", workload="gpt2", dtype="fp32", norm_type="2")
    if judged:
        worst = max(judged, key=lambda r: r["min_over_floor"])
        all_ = ", ".join(f"{r['layout']} {r['min_over_floor']:.2f}x" for r in judged)
        found.append(Target("sharded_gpt2_floor", "3", text, _verdict(worst["min_over_floor"] <= 1.1),
                            worst["min_over_floor"], f"worst {worst['min_over_floor']:.2f}x the floor on minimums "
                            f"({worst['layout']}; median {worst['median_over_floor']:.2f}x, "
                            f"{worst['min_over_side_floor']:.2f}x the side-by-side floor), {worst['nproc']} ranks; "
                            f"all: {all_}"))
    else:
        found.append(Target("sharded_gpt2_floor", "3", text, "n/a", None,
                            sharded_hint or "n/a: needs the gpt2 workload, fp32 and p=2"))

    # 3b. Sharded bf16 (float32-or-better accumulation) >= 3x faster than FSDP1's clip, on the models.
    text = "sharded bf16 (float32-or-better accumulation) >= 3x faster than FSDP1's clip"
    speedups = []
    for f in _find(records, mode="sharded", variant="fsdp1", dtype="bf16"):
        d = _one(records, mode="sharded", variant="distclip-fsdp1", workload=f["workload"], dtype="bf16",
                 norm_type=f["norm_type"])
        if d:
            speedups.append((f["min_s"] / d["min_s"], f))
    on_models = [s for s in speedups if s[1]["workload"] in MODEL_WORKLOADS]
    judged = on_models or speedups
    if judged:
        worst = min(judged, key=lambda x: x[0])
        scope = "the models (" + ", ".join(sorted({s[1]["workload"] for s in judged})) + ")"
        if not on_models:
            scope = "the measured workloads (no model workload was run)"
        others = ", ".join(f"{s[0]:.1f}x {_where(s[1])}" for s in speedups)
        found.append(Target("sharded_bf16_vs_fsdp1", "3", text, _verdict(worst[0] >= 3.0), worst[0],
                            f"worst {worst[0]:.2f}x ({_where(worst[1])}) over {scope}, same FSDP1 model "
                            f"clipped by distclip.clip_module_grad_norm_; all: {others}"))
    else:
        found.append(Target("sharded_bf16_vs_fsdp1", "3", text, "n/a", None,
                            sharded_hint or "n/a: needs bf16 in --dtypes and --fsdp1-dtypes"))

    # 3c. <= 1.5 us per tensor on 2000 tiny tensors, on every layout (issue 14; issue 8 asked 1 us of the views).
    text = ("sharded 2000 tiny tensors <= 1.5 us per tensor on every layout (call minus empty call, per tensor on a "
            "rank)")
    per_tensor = []
    for d in _find(records, mode="sharded", variant="distclip-sharded", workload="tiny"):
        e = _one(records, mode="sharded", variant="distclip-sharded-empty", workload="tiny", dtype=d["dtype"],
                 norm_type=d["norm_type"], layout=d["layout"])
        if e:
            per_tensor.append(((d["min_s"] - e["min_s"]) / d["tensors_per_rank"] * 1e6, d, e))
    if per_tensor:
        worst = max(per_tensor, key=lambda x: x[0])
        all_ = ", ".join(f"{x[0]:.2f} us {x[1]['dtype']} p={x[1]['norm_type']} {x[1]['layout']}" for x in per_tensor)
        found.append(Target("sharded_tiny_per_tensor", "3", text, _verdict(worst[0] <= 1.5), worst[0],
                            f"worst {worst[0]:.2f} us ({_where(worst[1])}: {_fmt_time(worst[1]['min_s'])} - empty "
                            f"{_fmt_time(worst[2]['min_s'])}, {worst[1]['tensors_per_rank']} tensors a rank); "
                            f"all: {all_}"))
    else:
        found.append(Target("sharded_tiny_per_tensor", "3", text, "n/a", None,
                            sharded_hint or "n/a: needs the tiny workload"))

    # 3d. inf within 1.5x of p=2.
    text = "sharded inf norm within 1.5x of the p=2 time"
    ratios = []
    for i in _find(records, mode="sharded", variant="distclip-sharded", norm_type="inf"):
        two = _one(records, mode="sharded", variant="distclip-sharded", workload=i["workload"], dtype=i["dtype"],
                   norm_type="2", layout=i["layout"])
        if two:
            ratios.append((i["min_s"] / two["min_s"], i))
    if ratios:
        worst = max(ratios, key=lambda x: x[0])
        found.append(Target("sharded_inf_vs_p2", "3", text, _verdict(worst[0] <= 1.5), worst[0],
                            f"worst {worst[0]:.2f}x ({worst[1]['workload']} {worst[1]['dtype']} {worst[1]['layout']}) "
                            f"over {len(ratios)} workload/dtype/layout cases"))
    else:
        found.append(Target("sharded_inf_vs_p2", "3", text, "n/a", None,
                            sharded_hint or "n/a: needs norm types 2 and inf"))

    found += _layout_targets(records, sharded_hint)

    # 4. The opt-in single-process fast path.
    for key, name, goal, label in (("fast_path_gpt2", "gpt2", 1.4, "GPT-2 fp32"),
                                   ("fast_path_small", "small", 3.0, "2000 small tensors fp32")):
        text = f"opt-in fast path (one process) >= {goal:g}x faster than torch on {label}"
        f = _one(records, mode="single", variant="distclip-fast", workload=name, dtype="fp32", norm_type="2")
        t = _one(records, mode="single", variant="torch", workload=name, dtype="fp32", norm_type="2")
        if f and t:
            speedup = t["min_s"] / f["min_s"]
            found.append(Target(key, "4", text, _verdict(speedup >= goal), speedup,
                                f"{speedup:.2f}x faster on minimums (median {t['median_s'] / f['median_s']:.2f}x); "
                                f"relative error vs float64 {f['rel_error']:.1e} (torch {t['rel_error']:.1e})"))
        else:
            found.append(Target(key, "4", text, "n/a", None, f"n/a: needs the {name} workload, fp32 and p=2"))

    # 5. Fused folding.
    text = "fused folding: clip + fused AdamW step <= 1.05x the fused step alone (GPT-2 fp32)"
    folded = _one(records, mode="fused", variant="folded-clip+adamw-fused")
    step = _one(records, mode="fused", variant="adamw-fused")
    if not fused_folding_available():
        found.append(Target("fused_folding", "5", text, "n/a", None, "n/a: not built yet (no GradClipper(fused=))"))
    elif folded and step:
        ratio = folded["min_s"] / step["min_s"]
        unfolded = _one(records, mode="fused", variant="clip+adamw-fused")
        more = f"; unfolded clip then step {unfolded['min_s'] / step['min_s']:.3f}x" if unfolded else ""
        found.append(Target("fused_folding", "5", text, _verdict(ratio <= 1.05), ratio,
                            f"{ratio:.3f}x on minimums (median {folded['median_s'] / step['median_s']:.3f}x; "
                            f"GradClipper(fused=True) clip_ + step){more}"))
    else:
        found.append(Target("fused_folding", "5", text, "n/a", None, "n/a: needs the gpt2 workload and fp32"))

    # 7. Memory: distclip's peak extra memory O(tensors), no gradient-sized temporary.
    text = (f"memory: distclip's peak extra memory <= {MEMORY_CONSTANT_BYTES >> 20} MiB + "
            f"{MEMORY_BYTES_PER_TENSOR} B per tensor (no gradient-sized temporary)")
    mine = [r for r in records if r["variant"] in ("distclip", "distclip-sharded", "distclip-fsdp1", "distclip-module")
            and r["peak_extra_bytes"] is not None]
    if mine:
        def excess(r):
            return r["peak_extra_bytes"] / (MEMORY_CONSTANT_BYTES + MEMORY_BYTES_PER_TENSOR * r["tensors_per_rank"])
        worst = max(mine, key=excess)
        largest = max(mine, key=lambda r: r["peak_extra_fraction"])
        found.append(Target("memory", "7", text, _verdict(excess(worst) <= 1.0), float(worst["peak_extra_bytes"]),
                            f"worst {_fmt_bytes(worst['peak_extra_bytes'])} ({worst['variant']} {_where(worst)}, "
                            f"{worst['tensors_per_rank']} tensors, {excess(worst):.2f}x the bound); largest fraction "
                            f"of the gradient bytes {largest['peak_extra_fraction']:.2%} ({largest['variant']} "
                            f"{_where(largest)})"))
    else:
        found.append(Target("memory", "7", text, "n/a", None, "n/a: the profiler reported no memory events"))
    return found


def _layout_targets(records: list[dict[str, Any]], sharded_hint: str | None) -> list[Target]:
    """Issue 14's targets: distclip against the clips it replaces, on every layout."""
    found = []
    # The hand-written sharded clip of each plain layout; torch's own clip of FSDP2's DTensors.
    text = ("distclip <= the hand-written sharded clip on every workload, dtype and layout (torch's DTensor clip on "
            "fsdp2)")
    ratios = []
    for d in _find(records, mode="sharded", variant="distclip-sharded"):
        reference = "torch-dtensor" if d["layout"] == "fsdp2" else "naive-sharded"
        n = _one(records, mode="sharded", variant=reference, workload=d["workload"], dtype=d["dtype"],
                 norm_type=d["norm_type"], layout=d["layout"])
        if n:
            ratios.append((d["min_s"] / n["min_s"], d))
    if ratios:
        worst = max(ratios, key=lambda x: x[0])
        over_one = ", ".join(f"{x[0]:.2f}x {_where(x[1])}" for x in ratios if x[0] > 1.0) or "none"
        found.append(Target("sharded_vs_hand_written", "14.2", text, _verdict(worst[0] <= 1.0), worst[0],
                            f"worst {worst[0]:.2f}x ({_where(worst[1])}) over {len(ratios)} cases; above 1: "
                            f"{over_one}"))
    else:
        found.append(Target("sharded_vs_hand_written", "14.2", text, "n/a", None,
                            sharded_hint or "n/a: needs a finite norm type"))

    text = "sharded 2000 small tensors <= FSDP1's clip time (of the same shapes), on every layout"
    ratios = []
    for f in _find(records, mode="sharded", variant="fsdp1", workload="small"):
        for d in _find(records, mode="sharded", variant="distclip-sharded", workload="small", dtype=f["dtype"],
                       norm_type=f["norm_type"]):
            ratios.append((d["min_s"] / f["min_s"], d))
    if ratios:
        worst = max(ratios, key=lambda x: x[0])
        all_ = ", ".join(f"{x[0]:.2f}x {x[1]['dtype']} p={x[1]['norm_type']} {x[1]['layout']}" for x in ratios)
        found.append(Target("small_vs_fsdp1", "14.2", text, _verdict(worst[0] <= 1.0), worst[0],
                            f"worst {worst[0]:.2f}x FSDP1's time ({_where(worst[1])}); all: {all_}"))
    else:
        found.append(Target("small_vs_fsdp1", "14.2", text, "n/a", None,
                            sharded_hint or "n/a: needs the small workload with a dtype in --fsdp1-dtypes"))

    text = "FSDP2 (400 or more parameters): distclip >= 1.5x faster than torch's DTensor clip"
    speedups = []
    for t in _find(records, mode="sharded", variant="torch-dtensor", layout="fsdp2"):
        if t["tensors"] < 400:
            continue
        for variant in ("distclip-sharded", "distclip-module"):
            d = _one(records, mode="sharded", variant=variant, workload=t["workload"], dtype=t["dtype"],
                     norm_type=t["norm_type"], layout="fsdp2")
            if d:
                speedups.append((t["min_s"] / d["min_s"], d))
    if speedups:
        worst = min(speedups, key=lambda x: x[0])
        all_ = ", ".join(f"{x[0]:.2f}x {x[1]['variant']} {x[1]['workload']} {x[1]['dtype']}" for x in speedups)
        found.append(Target("fsdp2_vs_torch", "14.2", text, _verdict(worst[0] >= 1.5), worst[0],
                            f"worst {worst[0]:.2f}x ({worst[1]['variant']}, {_where(worst[1])}); all: {all_}"))
    else:
        found.append(Target("fsdp2_vs_torch", "14.2", text, "n/a", None,
                            sharded_hint or "n/a: needs the fsdp2 layout, a finite p and a workload of 400+ tensors"))
    return found


def _paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The median over samples of ``a``'s i-th sample over ``b``'s: samples taken side by side (ABBA), so a
    slow drift of the machine cancels out."""
    return statistics.median(x / y for x, y in zip(a["samples_s"], b["samples_s"]))


def _verdict(holds: bool) -> str:
    return "PASS" if holds else "FAIL"


def context_lines(records: list[dict[str, Any]]) -> list[str]:
    """The issue's other measured claims, next to this run's numbers (not targets)."""
    lines = []
    for name, dtype in (("gpt2", "fp32"), ("gpt2", "bf16"), ("llama", "fp32"), ("llama", "bf16"), ("small", "fp32")):
        t = _one(records, mode="single", variant="torch", workload=name, dtype=dtype, norm_type="2")
        if t:
            lines.append(f"torch foreach clip, {name} {dtype} p=2: {t['min_over_floor']:.2f}x the floor "
                         f"(median {t['median_over_floor']:.2f}x)")
    for r in _find(records, mode="single", workload="tiny", norm_type="2"):
        if r["variant"] != "floor":
            lines.append(f"{r['variant']}, tiny {r['dtype']} p=2: {r['min_s'] / r['tensors'] * 1e6:.2f} us per "
                         f"tensor ({r['tensors']} tensors)")
    for f in _find(records, mode="sharded", variant="fsdp1", norm_type="2"):
        n = _one(records, mode="sharded", variant="naive-sharded", workload=f["workload"], dtype=f["dtype"],
                 norm_type="2")
        if n:
            lines.append(f"FSDP1's clip / naive sharded clip, {f['workload']} {f['dtype']} p=2: "
                         f"{f['min_s'] / n['min_s']:.2f}x")
    return lines


# ---------------------------------------------------------------------------------------------------- output


def _layout_name(r: dict[str, Any]) -> str:
    return r.get("layout") or ""


def _same_case(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("mode", "workload", "dtype", "norm_type", "layout"))


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class _Printer:
    """The run on stdout: a progress line per measured configuration, then the tables (once the floors are
    settled: they use the best bandwidth of the start and the end of the run)."""

    # For each variant, the one its "vs" column compares with.
    REFERENCE = {"distclip": "torch", "distclip-fast": "torch", "distclip-sharded": "naive-sharded",
                 "distclip-module": "torch-dtensor", "distclip-fsdp1": "fsdp1", "clip+adamw-fused": "adamw-fused",
                 "folded-clip+adamw-fused": "adamw-fused"}

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def line(self, text: str = "") -> None:
        if self.enabled:
            print(text, flush=True)

    def bandwidth(self, where: str, bw: Bandwidth) -> None:
        kernels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.kernels.items())
        self.line(f"bandwidth ({where}): read {bw.read / 1e9:.2f} GB/s, read+write {bw.read_write / 1e9:.2f} GB/s "
                  f"(best of each kernel, GB/s: {kernels})")

    def group(self, group: list[dict[str, Any]]) -> None:
        """One progress line: each variant's median (min) time."""
        first = group[0]
        times = ", ".join(f"{r['variant']} {_fmt_time(r['median_s'])} ({_fmt_time(r['min_s'])}"
                          + ("" if r.get("rel_error") is None else f", error {r['rel_error']:.1e}") + ")"
                          for r in group if r["variant"] != "floor")
        floor = next((f"; side-by-side floor {_fmt_time(r['floor_side_s'])}" for r in group
                      if r["variant"] == "floor"), "")
        self.line(f"  {_where(first)}: {times}{floor}")

    def table(self, title: str, rows: list[dict[str, Any]], over: str = "floor") -> None:
        self.line()
        self.line(f"== {title} ==")
        self.line(f"{'workload':<8} {'dtype':<5} {'p':<4} {'layout':<8} {'variant':<24} {'median':>10} {'min':>10} "
                  f"{'med/' + over:>10} {'min/' + over:>10} {'min/side':>8}  {'peak extra (of grads)':<22} {'error':>8} vs (min)")
        for r in rows:
            if r["variant"] == "floor":
                best = f", side-by-side floor {_fmt_time(r['floor_side_s'])}" if r.get("floor_side_s") else ""
                self.line(f"{r['workload']:<8} {r['dtype']:<5} {r['norm_type']:<4} {_layout_name(r):<8} {'floor':<24} "
                          f"{_fmt_time(r['floor_s']):>10} {'':>10} {'':>10} {'':>10} {'':>8}  {'':<22} {'':>8} "
                          f"{_fmt_bytes(r['bytes_per_rank'])} a process{best}")
                continue
            peak = "" if r["peak_extra_bytes"] is None else (
                f"{_fmt_bytes(r['peak_extra_bytes'])} ({r['peak_extra_fraction']:.2%})")
            reference = "torch-dtensor" if r["variant"] == "distclip-sharded" and r.get("layout") == "fsdp2" else \
                self.REFERENCE.get(r["variant"])
            ref = next((x for x in rows if x["variant"] == reference and _same_case(x, r)), None)
            versus = f"{r['min_s'] / ref['min_s']:.3f}x {ref['variant']}" if ref else ""
            best = f"{r['min_over_side_floor']:.2f}" if r.get("min_over_side_floor") and r["mode"] != "fused" else ""
            error = "" if r.get("rel_error") is None else f"{r['rel_error']:.1e}"
            self.line(f"{r['workload']:<8} {r['dtype']:<5} {r['norm_type']:<4} {_layout_name(r):<8} {r['variant']:<24} "
                      f"{_fmt_time(r['median_s']):>10} {_fmt_time(r['min_s']):>10} "
                      f"{r['median_over_floor']:>10.2f} {r['min_over_floor']:>10.2f} {best:>8}  {peak:<22} {error:>8} {versus}")


def plot(report: dict[str, Any], path: str) -> str | None:
    """Bars of time/floor (median; a tick at the minimum) per workload, grouped by dtype and p, one colour per
    variant, log scale, written with matplotlib's Agg backend. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    records = [r for r in report["results"] if r["variant"] not in ("floor", "distclip-sharded-empty")
               and r["mode"] in ("single", "sharded")]
    variants = list(dict.fromkeys(_series(r) for r in records))
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    fused = [r for r in report["results"] if r["mode"] == "fused"]
    panels = len(workloads) + (1 if fused else 0)
    cols = min(3, max(panels, 1))
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    colours = dict(zip(variants, plt.get_cmap("tab20").colors))
    nproc = report["config"]["nproc"]
    for ax, name in zip(axes.flat, workloads):
        mine = [r for r in records if r["workload"] == name]
        groups = list(dict.fromkeys((r["dtype"], r["norm_type"]) for r in mine))
        width = 0.8 / max(len(variants), 1)
        for j, variant in enumerate(variants):
            xs, heights, mins = [], [], []
            for i, (dtype, p) in enumerate(groups):
                r = next((r for r in mine if _series(r) == variant and r["dtype"] == dtype and r["norm_type"] == p),
                         None)
                if r:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    heights.append(r["median_over_floor"])
                    mins.append(r["min_over_floor"])
            if xs:
                ax.bar(xs, heights, width, color=colours[variant], label=variant)
                ax.scatter(xs, mins, marker="_", color="black", s=30, zorder=3)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), [f"{d} p={p}" for d, p in groups], fontsize=8)
        described = report.get("workloads", {}).get(name, {})
        n = described.get("tensors", 0)
        ax.set_title(f"{described.get('title', name)}, {n} tensor{'' if n == 1 else 's'}", fontsize=9)
        ax.set_ylabel("time / floor", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    extra = list(axes.flat)[len(workloads):]
    if fused and extra:
        ax = extra.pop(0)
        step = next(r for r in fused if r["variant"] == "adamw-fused")
        names = [r["variant"] for r in fused]
        ax.bar(range(len(fused)), [r["median_s"] / step["median_s"] for r in fused], color="tab:gray")
        ax.scatter(range(len(fused)), [r["min_s"] / step["min_s"] for r in fused], marker="_", color="black", s=30)
        ax.axhline(1.05, color="red", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(fused)), [n.replace("+", "+\n") for n in names], fontsize=7)
        ax.set_ylim(0.9, max(1.2, max(r["median_s"] / step["median_s"] for r in fused) * 1.05))
        ax.set_title("fused AdamW step, GPT-2 fp32 (time / step alone)", fontsize=9)
    for ax in extra:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    machine = report["machine"]
    fig.suptitle(f"distclip bench: time over the memory-bandwidth floor (bars: median, ticks: min; sharded: "
                 f"{nproc} gloo ranks); {machine['cores']} cores, torch {machine['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 * math.ceil(len(labels) / 6), 1, 0.95))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return None


def _series(r: dict[str, Any]) -> str:
    """A bar series of the plot: the variant, and the layout of a sharded one other than views."""
    return r["variant"] if r.get("layout") in (None, "views") else f"{r['variant']} [{r['layout']}]"


def markdown(report: dict[str, Any], image: str | None = None) -> str:
    """The run as markdown: machine, targets, the plot (``image``: its path from the page), the issue's claims
    beside this run's numbers, and one table per mode (for docs/benchmarks.md)."""
    m = report["machine"]
    state = m.get("distclip", {})
    changes = f" with local changes to {', '.join(state['modified'])}" if state.get("modified") else ""
    lines = [
        f"Measured {report['date']} with `{report['command']}`: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"Python {m['python']}; load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} "
        f"at the end (the machine was {'busy' if m['loadavg_start'][0] > 0.5 * m['cores'] else 'quiet'}). "
        f"distclip {state.get('version', '?')} at commit `{state.get('commit', '?')[:12]}`{changes}.",
        "",
        f"Best bandwidth of the run, single process ({m['single']['threads']} threads): read "
        f"{m['single']['read_GBps']:.2f} GB/s, read+write {m['single']['read_write_GBps']:.2f} GB/s.",
    ]
    if "sharded" in m:
        lines.append(f"Best bandwidth of the run, each of {report['config']['nproc']} ranks at once: read "
                     f"{m['sharded']['read_GBps']:.2f} GB/s, read+write {m['sharded']['read_write_GBps']:.2f} GB/s.")
    lines += ["", "| target | item | status | measured |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        lines.append(f"| {t['text']} | {t['item']} | **{t['status']}** | {t['detail']} |")
    if image:
        lines += ["", f"![time over the floor, per workload and variant]({image})"]
    lines += ["", "The issue's measured claims, in this run:", ""]
    lines += [f"- {line}" for line in context_lines(report["results"])]
    for mode, title in (("single", "Single process"), ("sharded", f"Sharded, {report['config']['nproc']} ranks"),
                        ("fused", "Fused AdamW (ratios over the fused step alone)")):
        rows = [r for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        lines += ["", f"**{title}**", "",
                  "| workload | dtype | p | layout | variant | median | min | median/floor | min/floor "
                  "| min/side-by-side floor | peak extra memory |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            peak = "" if r["peak_extra_bytes"] is None else \
                f"{_fmt_bytes(r['peak_extra_bytes'])} ({r['peak_extra_fraction']:.2%})"
            best = f"{r['min_over_side_floor']:.2f}" if r.get("min_over_side_floor") and mode != "fused" else ""
            lines.append(f"| {r['workload']} | {r['dtype']} | {r['norm_type']} | {_layout_name(r)} | "
                         f"{r['variant']} | "
                         f"{_fmt_time(r['median_s'])} | {_fmt_time(r['min_s'])} | {r['median_over_floor']:.2f} | "
                         f"{r['min_over_floor']:.2f} | {best} | {peak} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- run


def run(config: Config, command: str = "distclip bench") -> int:
    """Run the benchmark, print every measurement and every target, write the JSON and the plot.

    Returns 0 when the run completed (whatever the targets' status), 1 if a rank failed.
    """
    started = time.time()
    load_start = os.getloadavg()
    out = _Printer()
    cores = _usable_cores()
    out.line(f"distclip bench: {cores} cores, torch {torch.__version__}, load average "
             f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; workloads {','.join(config.workloads)}; "
             f"dtypes {','.join(config.dtypes)}; p {','.join(config.norm_types)}; {config.repeats} samples a variant"
             f"{' (quick sizes)' if config.quick else ''}")
    for name in config.workloads:
        wl = workload(name, config.quick, config.seed)
        plural = "" if len(wl.shapes) == 1 else "s"
        out.line(f"  {name}: {wl.title}, {len(wl.shapes)} tensor{plural}, {wl.numel:,} elements")
    records, single_machine = _run_single(config, out)
    machine: dict[str, Any] = {
        "cores": cores, "cpu": _cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "distclip": _distclip_state(), "loadavg_start": list(load_start),
        "single": single_machine,
    }
    status = 0
    if config.nproc >= 2:
        sharded = _run_sharded(config)
        if isinstance(sharded, str):
            out.line(f"distclip bench: the sharded run failed: {sharded}")
            status = 1
        else:
            sharded_records, sharded_machine = sharded
            records += sharded_records
            machine["sharded"] = sharded_machine
    machine["loadavg_end"] = list(os.getloadavg())
    found = targets(records, config)
    out.table(f"single process, {machine['single']['threads']} threads: time per clip, and over the floor",
              _find(records, mode="single"))
    if _find(records, mode="sharded"):
        out.table(f"sharded, {config.nproc} gloo ranks (the slowest rank's time per clip), over the per-rank floor",
                  _find(records, mode="sharded"))
    if _find(records, mode="fused"):
        out.table("fused AdamW on GPT-2 fp32: time per step, over the fused step alone (its median)",
                  _find(records, mode="fused"), over="step")
    out.line()
    out.line("== context: the issue's measured claims, in this run ==")
    for line in context_lines(records):
        out.line("  " + line)
    out.line()
    out.line("== targets (issues 8 and 14), judged on minimums ==")
    for target in found:
        out.line(target.line())
    report = {
        "command": command,
        "workloads": {name: {"title": w.title, "tensors": len(w.shapes), "elements": w.numel}
                      for name, w in ((name, workload(name, config.quick, config.seed)) for name in config.workloads)},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": time.time() - started,
        "config": {**dataclasses.asdict(config), "max_norm": _MAX_NORM, "min_sample_s": config.min_sample_s,
                   "bandwidth_buffer_bytes": config.bandwidth_elements * 4},
        "machine": machine,
        "results": records,
        "targets": [dataclasses.asdict(t) for t in found],
    }
    out.line()
    if config.json_path:
        with open(config.json_path, "w") as f:
            json.dump(report, f, indent=1)
        out.line(f"wrote {config.json_path}")
    if config.plot_path:
        skipped = plot(report, config.plot_path)
        out.line(skipped or f"wrote {config.plot_path}")
    out.line(f"distclip bench: done in {report['duration_s']:.0f} s; load average {machine['loadavg_end'][0]:.2f}")
    return status


def _distclip_state() -> dict[str, Any]:
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_list(text: str, allowed: Sequence[str] | None, what: str) -> tuple[str, ...]:
    """A comma list, each item checked against ``allowed`` (``None``: norm types, numbers or inf)."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ValueError(f"{what}: an empty list")
    for item in items:
        if allowed is not None and item not in allowed:
            raise ValueError(f"{what}: unknown {item!r}; choose from {', '.join(allowed)}")
        if allowed is None:
            try:
                p = float(item)
            except ValueError:
                raise ValueError(f"{what}: {item!r} is not a number or inf") from None
            if not p > 0:
                raise ValueError(f"{what}: {item!r}: the sharded variants need p > 0 or inf")
    if allowed is None:
        items = tuple(_p_name(float(item)) for item in items)
    return items


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: distclip bench (or python -m distclip bench)")
