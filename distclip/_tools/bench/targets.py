"""The bench's targets: each one's worst case in the records and its judgement, PASS or FAIL (n/a when what it
needs was not measured)."""

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distclip._tools.bench.measure import (
    Config,
    case_of,
    find,
    fused_folding_available,
    one,
)
from distclip._tools.bench.report import fmt_bytes, fmt_time
from distclip._tools.bench.workloads import MODEL_WORKLOADS

# Peak extra memory allowed to a distclip clip: O(number of tensors), no gradient-sized temporary.
# The constant covers the 1 MiB float32 buffer of a sharded CPU norm and an inf norm's batch of small tensors.
MEMORY_CONSTANT_BYTES = 4 << 20
MEMORY_BYTES_PER_TENSOR = 1024


@dataclass(frozen=True)
class Target:
    """One target: ``item`` the number of the requirement it checks (the report's item column), ``status`` PASS,
    FAIL or n/a, ``measured`` the ratio (or value) it is judged on."""

    key: str
    item: str
    text: str
    status: str
    measured: float | None
    detail: str

    def line(self) -> str:
        return f"[{self.status:<4}] {self.key}: {self.text}: {self.detail}"


def targets(records: list[dict[str, Any]], config: Config) -> list[Target]:
    """Every target with its measured ratio and whether it holds (judged on minimums: on a shared machine noise
    only ever adds time; the medians are printed beside them)."""
    sharded_hint = "n/a: run with --nproc 2 (or more)" if config.nproc < 2 else None

    # Parity mode costs at most 3% over torch, on every workload.
    pairs = []
    for d in find(records, mode="single", variant="distclip"):
        t = one(records, mode="single", variant="torch", workload=d["workload"], dtype=d["dtype"],
                norm_type=d["norm_type"])
        if t:
            pairs.append((d["min_s"] / t["min_s"], d, _paired_ratio(d, t)))

    def parity(worst: tuple) -> str:
        paired = max(pairs, key=lambda x: x[2])
        return (f"worst {worst[0]:.3f}x ({case_of(worst[1])}) on minimums; worst median of the paired samples' "
                f"ratios {paired[2]:.3f}x ({case_of(paired[1])}); {len(pairs)} configurations")

    found = [_judge("parity", "2", "distclip (group=None) <= 1.03x torch on every workload", pairs, 1.03, parity,
                    "n/a: no single-process measurement")]

    # Sharded GPT-2 fp32 <= 1.1x the floor, on every layout.
    judged = find(records, mode="sharded", variant="distclip-sharded", workload="gpt2", dtype="fp32", norm_type="2")
    all_ = ", ".join(f"{r['layout']} {r['min_over_floor']:.2f}x" for r in judged)
    found.append(_judge(
        "sharded_gpt2_floor", "3", "sharded GPT-2 fp32 (p=2) <= 1.1x the floor, on every layout",
        [(r["min_over_floor"], r) for r in judged], 1.1,
        lambda worst: f"worst {worst[0]:.2f}x the floor on minimums ({worst[1]['layout']}; median "
                      f"{worst[1]['median_over_floor']:.2f}x, {worst[1]['min_over_side_floor']:.2f}x the side-by-side "
                      f"floor), {worst[1]['nproc']} ranks; all: {all_}",
        sharded_hint or "n/a: needs the gpt2 workload, fp32 and p=2"))

    # Sharded bf16 (float32-or-better accumulation) >= 3x faster than FSDP1's clip, on the models.
    speedups = []
    for f in find(records, mode="sharded", variant="fsdp1", dtype="bf16"):
        d = one(records, mode="sharded", variant="distclip-fsdp1", workload=f["workload"], dtype="bf16",
                norm_type=f["norm_type"])
        if d:
            speedups.append((f["min_s"] / d["min_s"], f))
    on_models = [s for s in speedups if s[1]["workload"] in MODEL_WORKLOADS]
    scope = ("the models (" + ", ".join(sorted({s[1]["workload"] for s in on_models})) + ")" if on_models
             else "the measured workloads (no model workload was run)")
    others = ", ".join(f"{s[0]:.1f}x {case_of(s[1])}" for s in speedups)
    found.append(_judge(
        "sharded_bf16_vs_fsdp1", "3", "sharded bf16 (float32-or-better accumulation) >= 3x faster than FSDP1's clip",
        on_models or speedups, 3.0,
        lambda worst: f"worst {worst[0]:.2f}x ({case_of(worst[1])}) over {scope}, same FSDP1 model clipped by "
                      f"distclip.clip_module_grad_norm_; all: {others}",
        sharded_hint or "n/a: needs bf16 in --dtypes and --fsdp1-dtypes", at_least=True))

    # <= 1.5 us per tensor on 2000 tiny tensors, on every layout.
    per_tensor = []
    for d in find(records, mode="sharded", variant="distclip-sharded", workload="tiny"):
        e = one(records, mode="sharded", variant="distclip-sharded-empty", workload="tiny", dtype=d["dtype"],
                norm_type=d["norm_type"], layout=d["layout"])
        if e:
            per_tensor.append(((d["min_s"] - e["min_s"]) / d["tensors_per_rank"] * 1e6, d, e))
    all_tiny = ", ".join(f"{x[0]:.2f} us {x[1]['dtype']} p={x[1]['norm_type']} {x[1]['layout']}" for x in per_tensor)
    found.append(_judge(
        "sharded_tiny_per_tensor", "3",
        "sharded 2000 tiny tensors <= 1.5 us per tensor on every layout (call minus empty call, per tensor on a rank)",
        per_tensor, 1.5,
        lambda worst: f"worst {worst[0]:.2f} us ({case_of(worst[1])}: {fmt_time(worst[1]['min_s'])} - empty "
                      f"{fmt_time(worst[2]['min_s'])}, {worst[1]['tensors_per_rank']} tensors a rank); all: {all_tiny}",
        sharded_hint or "n/a: needs the tiny workload"))

    # inf within 1.5x of p=2.
    ratios = []
    for i in find(records, mode="sharded", variant="distclip-sharded", norm_type="inf"):
        two = one(records, mode="sharded", variant="distclip-sharded", workload=i["workload"], dtype=i["dtype"],
                  norm_type="2", layout=i["layout"])
        if two:
            ratios.append((i["min_s"] / two["min_s"], i))
    found.append(_judge(
        "sharded_inf_vs_p2", "3", "sharded inf norm within 1.5x of the p=2 time", ratios, 1.5,
        lambda worst: f"worst {worst[0]:.2f}x ({worst[1]['workload']} {worst[1]['dtype']} {worst[1]['layout']}) "
                      f"over {len(ratios)} workload/dtype/layout cases",
        sharded_hint or "n/a: needs norm types 2 and inf"))

    found += _layout_targets(records, sharded_hint)

    # The opt-in single-process fast path.
    for key, name, goal, label in (("fast_path_gpt2", "gpt2", 1.4, "GPT-2 fp32"),
                                   ("fast_path_small", "small", 3.0, "2000 small tensors fp32")):
        f = one(records, mode="single", variant="distclip-fast", workload=name, dtype="fp32", norm_type="2")
        t = one(records, mode="single", variant="torch", workload=name, dtype="fp32", norm_type="2")
        found.append(_judge(
            key, "4", f"opt-in fast path (one process) >= {goal:g}x faster than torch on {label}",
            [(t["min_s"] / f["min_s"], f, t)] if f and t else [], goal,
            lambda worst: f"{worst[0]:.2f}x faster on minimums (median "
                          f"{worst[2]['median_s'] / worst[1]['median_s']:.2f}x); relative error vs float64 "
                          f"{worst[1]['rel_error']:.1e} (torch {worst[2]['rel_error']:.1e})",
            f"n/a: needs the {name} workload, fp32 and p=2", at_least=True))

    # Fused folding.
    available = fused_folding_available()
    folded = one(records, mode="fused", variant="folded-clip+adamw-fused")
    step = one(records, mode="fused", variant="adamw-fused")

    def fused(worst: tuple) -> str:
        ratio, folded, step = worst
        unfolded = one(records, mode="fused", variant="clip+adamw-fused")
        more = f"; unfolded clip then step {unfolded['min_s'] / step['min_s']:.3f}x" if unfolded else ""
        return (f"{ratio:.3f}x on minimums (median {folded['median_s'] / step['median_s']:.3f}x; "
                f"GradClipper(fused=True) clip_ + step){more}")

    found.append(_judge(
        "fused_folding", "5", "fused folding: clip + fused AdamW step <= 1.05x the fused step alone (GPT-2 fp32)",
        [(folded["min_s"] / step["min_s"], folded, step)] if available and folded and step else [], 1.05, fused,
        "n/a: needs the gpt2 workload and fp32" if available else "n/a: not built yet (no GradClipper(fused=))"))

    # Memory: distclip's peak extra memory O(tensors), no gradient-sized temporary.
    mine = [r for r in records if r["variant"] in ("distclip", "distclip-sharded", "distclip-fsdp1", "distclip-module")
            and r["peak_extra_bytes"] is not None]

    def memory(worst: tuple) -> str:
        excess, r = worst
        largest = max(mine, key=lambda x: x["peak_extra_fraction"])
        return (f"worst {fmt_bytes(r['peak_extra_bytes'])} ({r['variant']} {case_of(r)}, {r['tensors_per_rank']} "
                f"tensors, {excess:.2f}x the bound); largest fraction of the gradient bytes "
                f"{largest['peak_extra_fraction']:.2%} ({largest['variant']} {case_of(largest)})")

    found.append(_judge(
        "memory", "7", f"memory: distclip's peak extra memory <= {MEMORY_CONSTANT_BYTES >> 20} MiB + "
                       f"{MEMORY_BYTES_PER_TENSOR} B per tensor (no gradient-sized temporary)",
        [(r["peak_extra_bytes"] / (MEMORY_CONSTANT_BYTES + MEMORY_BYTES_PER_TENSOR * r["tensors_per_rank"]), r)
         for r in mine], 1.0, memory,
        "n/a: the profiler reported no memory events", measured=lambda worst: float(worst[1]["peak_extra_bytes"])))
    return found


def _layout_targets(records: list[dict[str, Any]], sharded_hint: str | None) -> list[Target]:
    """The targets that compare distclip with the clips it replaces, on every layout."""
    # The hand-written sharded clip of each plain layout; torch's own clip of FSDP2's DTensors.
    ratios = []
    for d in find(records, mode="sharded", variant="distclip-sharded"):
        reference = "torch-dtensor" if d["layout"] == "fsdp2" else "naive-sharded"
        n = one(records, mode="sharded", variant=reference, workload=d["workload"], dtype=d["dtype"],
                norm_type=d["norm_type"], layout=d["layout"])
        if n:
            ratios.append((d["min_s"] / n["min_s"], d))
    over_one = ", ".join(f"{x[0]:.2f}x {case_of(x[1])}" for x in ratios if x[0] > 1.0) or "none"
    found = [_judge(
        "sharded_vs_hand_written", "14.2",
        "distclip <= the hand-written sharded clip on every workload, dtype and layout (torch's DTensor clip on fsdp2)",
        ratios, 1.0,
        lambda worst: f"worst {worst[0]:.2f}x ({case_of(worst[1])}) over {len(ratios)} cases; above 1: {over_one}",
        sharded_hint or "n/a: needs a finite norm type")]

    small = []
    for f in find(records, mode="sharded", variant="fsdp1", workload="small"):
        for d in find(records, mode="sharded", variant="distclip-sharded", workload="small", dtype=f["dtype"],
                      norm_type=f["norm_type"]):
            small.append((d["min_s"] / f["min_s"], d))
    all_small = ", ".join(f"{x[0]:.2f}x {x[1]['dtype']} p={x[1]['norm_type']} {x[1]['layout']}" for x in small)
    found.append(_judge(
        "small_vs_fsdp1", "14.2",
        "sharded 2000 small tensors <= FSDP1's clip time (of the same shapes), on every layout", small, 1.0,
        lambda worst: f"worst {worst[0]:.2f}x FSDP1's time ({case_of(worst[1])}); all: {all_small}",
        sharded_hint or "n/a: needs the small workload with a dtype in --fsdp1-dtypes"))

    speedups = []
    for t in find(records, mode="sharded", variant="torch-dtensor", layout="fsdp2"):
        if t["tensors"] < 400:
            continue
        for variant in ("distclip-sharded", "distclip-module"):
            d = one(records, mode="sharded", variant=variant, workload=t["workload"], dtype=t["dtype"],
                    norm_type=t["norm_type"], layout="fsdp2")
            if d:
                speedups.append((t["min_s"] / d["min_s"], d))
    all_fsdp2 = ", ".join(f"{x[0]:.2f}x {x[1]['variant']} {x[1]['workload']} {x[1]['dtype']}" for x in speedups)
    found.append(_judge(
        "fsdp2_vs_torch", "14.2", "FSDP2 (400 or more parameters): distclip >= 1.5x faster than torch's DTensor clip",
        speedups, 1.5,
        lambda worst: f"worst {worst[0]:.2f}x ({worst[1]['variant']}, {case_of(worst[1])}); all: {all_fsdp2}",
        sharded_hint or "n/a: needs the fsdp2 layout, a finite p and a workload of 400+ tensors", at_least=True))
    return found


def _judge(
    key: str, item: str, text: str, cases: list[tuple], bound: float, detail: Callable[[tuple], str], missing: str,
    at_least: bool = False, measured: Callable[[tuple], float] | None = None,
) -> Target:
    """A target judged on ``cases``, each a tuple of its value and what it was measured from: n/a (``missing``
    says why) without cases, else the worst case, the largest value (``at_least``: the smallest), and PASS if it
    is at most ``bound`` (``at_least``: at least), FAIL if not; ``detail(worst)`` says how it went, and
    ``measured(worst)`` is the number kept (by default the worst value)."""
    if not cases:
        return Target(key, item, text, "n/a", None, missing)
    worst = (min if at_least else max)(cases, key=lambda case: case[0])
    holds = worst[0] >= bound if at_least else worst[0] <= bound
    return Target(key, item, text, "PASS" if holds else "FAIL", worst[0] if measured is None else measured(worst),
                  detail(worst))


def _paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The median over samples of ``a``'s i-th sample over ``b``'s: samples taken side by side (ABBA), so a
    slow drift of the machine cancels out."""
    return statistics.median(x / y for x, y in zip(a["samples_s"], b["samples_s"]))
