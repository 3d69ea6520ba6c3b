"""``distclip bench``: how close clipping sits to the memory-bandwidth floor, and its peak extra memory.

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

Memory: one call of each variant runs under ``torch.profiler`` with ``profile_memory=True``; the peak
of the running sum of the CPU allocator's allocations and frees, in event order, is the variant's peak extra
memory (what the call allocated beyond what existed before it), reported in bytes and as a fraction of the
gradient bytes (the largest over ranks when sharded).

Run: ``distclip bench`` (``--help`` for the options); the reading guide is ``docs/benchmarks.md``. The bench's
parts: `workloads` (the gradients and models), `measure` (timing, memory, the records), `targets` (PASS/FAIL)
and `report` (the tables, the plot, the markdown); `run` here ties them together.
"""

import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from distclip._tools.bench import targets
from distclip._tools.bench.measure import (
    Config,
    allocator,
    cpu_name,
    distclip_state,
    find,
    peak_extra_bytes,
    run_sharded,
    run_single,
    usable_cores,
)
from distclip._tools.bench.report import Printer, context_lines, markdown, plot
from distclip._tools.bench.workloads import (
    DTYPES,
    LAYOUTS,
    MAX_NORM,
    WORKLOADS,
    p_name,
    workload,
)

# What the command line, benchmarks/run.py and the tests use.
__all__ = ["DTYPES", "LAYOUTS", "WORKLOADS", "Config", "markdown", "parse_list", "peak_extra_bytes", "plot", "run"]


def run(config: Config, command: str = "distclip bench") -> int:
    """Run the benchmark, print every measurement and every target, write the JSON and the plot.

    Returns 0 when the run completed (whatever the targets' status), 1 if a rank failed.
    """
    started = time.time()
    load_start = os.getloadavg()
    out = Printer()
    cores = usable_cores()
    out.line(f"distclip bench: {cores} cores, torch {torch.__version__}, {allocator()}, load average "
             f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; workloads {','.join(config.workloads)}; "
             f"dtypes {','.join(config.dtypes)}; p {','.join(config.norm_types)}; {config.repeats} samples a variant"
             f"{' (quick sizes)' if config.quick else ''}")
    for name in config.workloads:
        wl = workload(name, config.quick, config.seed)
        plural = "" if len(wl.shapes) == 1 else "s"
        out.line(f"  {name}: {wl.title}, {len(wl.shapes)} tensor{plural}, {wl.numel:,} elements")
    records, single_machine = run_single(config, out)
    machine: dict[str, Any] = {
        "cores": cores, "cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "allocator": allocator(), "distclip": distclip_state(),
        "loadavg_start": list(load_start),
        "single": single_machine,
    }
    status = 0
    if config.nproc >= 2:
        sharded = run_sharded(config, out)
        if isinstance(sharded, str):
            out.line(f"distclip bench: the sharded run failed: {sharded}")
            status = 1
        else:
            sharded_records, sharded_machine = sharded
            records += sharded_records
            machine["sharded"] = sharded_machine
    machine["loadavg_end"] = list(os.getloadavg())
    found = targets.targets(records, config)
    out.table(f"single process, {machine['single']['threads']} threads: time per clip, and over the floor",
              find(records, mode="single"))
    if find(records, mode="sharded"):
        out.table(f"sharded, {config.nproc} gloo ranks (the slowest rank's time per clip), over the per-rank floor",
                  find(records, mode="sharded"))
    if find(records, mode="fused"):
        out.table("fused AdamW on GPT-2 fp32: time per step, over the fused step alone (its median)",
                  find(records, mode="fused"), over="step")
    out.line()
    out.line("== context: the measured claims this bench was built to check, in this run ==")
    for line in context_lines(records):
        out.line("  " + line)
    out.line()
    out.line("== targets, judged on minimums ==")
    for target in found:
        out.line(target.line())
    report = {
        "command": command,
        "workloads": {name: {"title": w.title, "tensors": len(w.shapes), "elements": w.numel}
                      for name, w in ((name, workload(name, config.quick, config.seed)) for name in config.workloads)},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": time.time() - started,
        "config": {**dataclasses.asdict(config), "max_norm": MAX_NORM, "min_sample_s": config.min_sample_s,
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
        items = tuple(p_name(float(item)) for item in items)
    return items
