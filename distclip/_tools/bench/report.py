"""The bench's output: progress lines and tables on stdout, the context lines beside the targets, the plot, and
the markdown of a run for docs/benchmarks.md."""

import math
from typing import Any, ClassVar

from distclip._tools.bench.measure import Bandwidth, case_of, compile_line, find, one


def _layout_name(r: dict[str, Any]) -> str:
    return r.get("layout") or ""


def _same_case(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("mode", "workload", "dtype", "norm_type", "layout"))


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Printer:
    """The run on stdout: a progress line per measured configuration, then the tables (once the floors are
    settled: they use the best bandwidth of the start and the end of the run)."""

    # For each variant, the one its "vs" column compares with.
    REFERENCE: ClassVar[dict[str, str]] = {
        "distclip": "torch", "distclip-fast": "torch", "distclip-sharded": "naive-sharded",
        "distclip-module": "torch-dtensor", "distclip-fsdp1": "fsdp1", "clip+adamw-fused": "adamw-fused",
        "folded-clip+adamw-fused": "adamw-fused",
    }

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_rank(self, rank: int) -> "Printer":
        """This printer on rank 0, a silent one on the other ranks."""
        return self if rank == 0 else Printer(enabled=False)

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
        times = ", ".join(f"{r['variant']} {fmt_time(r['median_s'])} ({fmt_time(r['min_s'])}"
                          + ("" if r.get("rel_error") is None else f", error {r['rel_error']:.1e}") + ")"
                          for r in group if r["variant"] != "floor")
        floor = next((f"; side-by-side floor {fmt_time(r['floor_side_s'])}" for r in group
                      if r["variant"] == "floor"), "")
        self.line(f"  {case_of(first)}: {times}{floor}")

    def table(self, title: str, rows: list[dict[str, Any]], over: str = "floor") -> None:
        self.line()
        self.line(f"== {title} ==")
        self.line(f"{'workload':<8} {'dtype':<5} {'p':<4} {'layout':<8} {'variant':<24} {'median':>10} {'min':>10} "
                  f"{'med/' + over:>10} {'min/' + over:>10} {'min/side':>8}  {'peak extra (of grads)':<22} {'error':>8} vs (min)")
        for r in rows:
            if r["variant"] == "floor":
                best = f", side-by-side floor {fmt_time(r['floor_side_s'])}" if r.get("floor_side_s") else ""
                self.line(f"{r['workload']:<8} {r['dtype']:<5} {r['norm_type']:<4} {_layout_name(r):<8} {'floor':<24} "
                          f"{fmt_time(r['floor_s']):>10} {'':>10} {'':>10} {'':>10} {'':>8}  {'':<22} {'':>8} "
                          f"{fmt_bytes(r['bytes_per_rank'])} a process{best}")
                continue
            peak = "" if r["peak_extra_bytes"] is None else (
                f"{fmt_bytes(r['peak_extra_bytes'])} ({r['peak_extra_fraction']:.2%})")
            reference = "torch-dtensor" if r["variant"] == "distclip-sharded" and r.get("layout") == "fsdp2" else \
                self.REFERENCE.get(r["variant"])
            ref = next((x for x in rows if x["variant"] == reference and _same_case(x, r)), None)
            versus = f"{r['min_s'] / ref['min_s']:.3f}x {ref['variant']}" if ref else ""
            best = f"{r['min_over_side_floor']:.2f}" if r.get("min_over_side_floor") and r["mode"] != "fused" else ""
            error = "" if r.get("rel_error") is None else f"{r['rel_error']:.1e}"
            self.line(f"{r['workload']:<8} {r['dtype']:<5} {r['norm_type']:<4} {_layout_name(r):<8} {r['variant']:<24} "
                      f"{fmt_time(r['median_s']):>10} {fmt_time(r['min_s']):>10} "
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


def context_lines(records: list[dict[str, Any]]) -> list[str]:
    """The other measured claims this bench was built to check, next to this run's numbers (not targets)."""
    lines = []
    for name, dtype in (("gpt2", "fp32"), ("gpt2", "bf16"), ("llama", "fp32"), ("llama", "bf16"), ("small", "fp32")):
        t = one(records, mode="single", variant="torch", workload=name, dtype=dtype, norm_type="2")
        if t:
            lines.append(f"torch foreach clip, {name} {dtype} p=2: {t['min_over_floor']:.2f}x the floor "
                         f"(median {t['median_over_floor']:.2f}x)")
    for r in find(records, mode="single", workload="tiny", norm_type="2"):
        if r["variant"] != "floor":
            lines.append(f"{r['variant']}, tiny {r['dtype']} p=2: {r['min_s'] / r['tensors'] * 1e6:.2f} us per "
                         f"tensor ({r['tensors']} tensors)")
    for f in find(records, mode="sharded", variant="fsdp1", norm_type="2"):
        n = one(records, mode="sharded", variant="naive-sharded", workload=f["workload"], dtype=f["dtype"],
                 norm_type="2")
        if n:
            lines.append(f"FSDP1's clip / naive sharded clip, {f['workload']} {f['dtype']} p=2: "
                         f"{f['min_s'] / n['min_s']:.2f}x")
    return lines


def markdown(report: dict[str, Any], image: str | None = None) -> str:
    """The run as markdown: machine, targets, the plot (``image``: its path from the page), the other measured
    claims beside this run's numbers, and one table per mode (for docs/benchmarks.md)."""
    m = report["machine"]
    state = m.get("distclip", {})
    changes = f" with local changes to {', '.join(state['modified'])}" if state.get("modified") else ""
    alloc = m.get("allocator", "the C library's malloc")  # runs before it was recorded had no preload
    lines = [
        (f"Measured {report['date']} with `{report['command']}`: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
         f"Python {m['python']}, {alloc}; load average "
         f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} "
         f"at the end (the machine was {'busy' if m['loadavg_start'][0] > 0.5 * m['cores'] else 'quiet'}). "
         f"distclip {state.get('version', '?')} at commit `{state.get('commit', '?')[:12]}`{changes}."),
        "",
        (f"Best bandwidth of the run, single process ({m['single']['threads']} threads): read "
         f"{m['single']['read_GBps']:.2f} GB/s, read+write {m['single']['read_write_GBps']:.2f} GB/s."),
    ]
    if "sharded" in m:
        lines.append(f"Best bandwidth of the run, each of {report['config']['nproc']} ranks at once: read "
                     f"{m['sharded']['read_GBps']:.2f} GB/s, read+write {m['sharded']['read_write_GBps']:.2f} GB/s.")
        if m["sharded"].get("compile_s"):
            lines.append(compile_line(m["sharded"]["compile_s"]) + ".")
    lines += ["", "| target | item | status | measured |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        lines.append(f"| {t['text']} | {t['item']} | **{t['status']}** | {t['detail']} |")
    if image:
        lines += ["", f"![time over the floor, per workload and variant]({image})"]
    lines += ["", "The measured claims this bench was built to check, in this run:", ""]
    lines += [f"- {line}" for line in context_lines(report["results"])]
    for mode, title in (("single", "Single process"), ("sharded", f"Sharded, {report['config']['nproc']} ranks"),
                        ("fused", "Fused AdamW (ratios over the fused step alone)")):
        rows = [r for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        lines += ["", f"**{title}**", "",
                  ("| workload | dtype | p | layout | variant | median | min | median/floor | min/floor "
                   "| min/side-by-side floor | peak extra memory |"),
                  "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            peak = "" if r["peak_extra_bytes"] is None else \
                f"{fmt_bytes(r['peak_extra_bytes'])} ({r['peak_extra_fraction']:.2%})"
            best = f"{r['min_over_side_floor']:.2f}" if r.get("min_over_side_floor") and mode != "fused" else ""
            lines.append(f"| {r['workload']} | {r['dtype']} | {r['norm_type']} | {_layout_name(r)} | "
                         f"{r['variant']} | "
                         f"{fmt_time(r['median_s'])} | {fmt_time(r['min_s'])} | {r['median_over_floor']:.2f} | "
                         f"{r['min_over_floor']:.2f} | {best} | {peak} |")
    return "\n".join(lines) + "\n"
