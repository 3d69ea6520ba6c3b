"""``distclip bench`` run for real on a tiny configuration: single process and 2 gloo ranks.

A smoke test of the suite's plumbing (the JSON's structure, every target printed): speed is never asserted.
"""

import json
import os
import subprocess
import sys

import pytest

TIMEOUT_S = 120
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
TARGETS = ("parity", "sharded_gpt2_floor", "sharded_bf16_vs_fsdp1", "sharded_tiny_per_tensor", "sharded_inf_vs_p2",
           "sharded_vs_hand_written", "small_vs_fsdp1", "fsdp2_vs_torch", "fast_path_gpt2", "fast_path_small",
           "fused_folding", "memory")
LAYOUTS = ("views", "separate", "aligned", "fsdp2")
RECORD_KEYS = {"mode", "nproc", "workload", "dtype", "norm_type", "layout", "variant", "tensors", "tensors_per_rank", "bytes",
               "bytes_per_rank", "samples_s", "median_s", "min_s", "floor_s", "median_over_floor",
               "min_over_floor", "peak_extra_bytes", "peak_extra_fraction", "rel_error"}


def bench(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    report_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "distclip", "bench", "--quick", "--repeats", "1", "--json", str(report_path),
         "--plot", "", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    with open(report_path) as f:
        return result, json.load(f)


def target_lines(stdout: str) -> dict[str, str]:
    """``key: status`` of every ``[STATUS] key: ...`` line."""
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("[") and "] " in line:
            status, rest = line[1:].split("] ", 1)
            lines[rest.split(":", 1)[0]] = status.strip()
    return lines


def check_report(report: dict, nproc: int, variants: set[str]) -> None:
    assert report["config"]["nproc"] == nproc
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch"]
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert machine["single"]["read_GBps"] > 0 and machine["single"]["read_write_GBps"] > 0
    assert {r["variant"] for r in report["results"]} == variants
    for record in report["results"]:
        assert RECORD_KEYS <= set(record), record
        assert record["min_s"] > 0 and record["median_s"] >= record["min_s"] and record["floor_s"] > 0
        if record["variant"] != "floor":
            assert 1 <= len(record["samples_s"]) <= 3
            assert record["peak_extra_bytes"] is None or record["peak_extra_bytes"] >= 0
        if record["mode"] == "single" and record["variant"] != "floor":  # accuracy of what each variant returned
            assert 0 <= record["rel_error"] < 1e-2, record
    assert [t["key"] for t in report["targets"]] == list(TARGETS)
    assert {t["status"] for t in report["targets"]} <= {"PASS", "FAIL", "n/a"}


def test_bench_single_process(tmp_path):
    result, report = bench(tmp_path, "--nproc", "0", "--workloads", "tiny,small", "--dtypes", "fp32", "--norm-types", "2")
    check_report(report, 0, {"torch", "distclip", "distclip-fast", "floor"})
    statuses = target_lines(result.stdout)
    assert set(TARGETS) <= set(statuses), result.stdout
    for key in ("parity", "memory", "fast_path_small"):
        assert statuses[key] in ("PASS", "FAIL"), result.stdout
    assert statuses["fast_path_gpt2"] == "n/a", result.stdout
    assert statuses["sharded_gpt2_floor"] == "n/a" and "run with --nproc 2" in result.stdout


def test_bench_two_ranks_with_fsdp1(tmp_path):
    result, report = bench(tmp_path, "--nproc", "2", "--workloads", "tiny", "--dtypes", "bf16", "--norm-types", "2,inf")
    check_report(report, 2, {"torch", "distclip", "distclip-fast", "floor", "distclip-sharded", "naive-sharded", "fsdp1",
                             "distclip-fsdp1", "distclip-sharded-empty", "distclip-module", "torch-dtensor"})
    assert report["machine"]["sharded"]["read_GBps"] > 0
    sharded = [r for r in report["results"] if r["mode"] == "sharded"]
    assert {r["layout"] for r in sharded} == set(LAYOUTS)
    # 200 tiny tensors: a rank holds 100 of them whole, or a shard of each of the 200 FSDP2 parameters.
    assert sharded and all(r["nproc"] == 2 and r["tensors_per_rank"] == (200 if r["layout"] == "fsdp2" else 100)
                           for r in sharded)
    for layout in LAYOUTS:  # every target that compares distclip with a clip it replaces is judged on every layout
        assert any(r["layout"] == layout and r["variant"] == "distclip-sharded" for r in sharded), layout
    assert {r["layout"] for r in sharded if r["variant"] == "fsdp1"} == {"views"}
    statuses = target_lines(result.stdout)
    assert set(TARGETS) <= set(statuses), result.stdout
    for key in ("sharded_bf16_vs_fsdp1", "sharded_tiny_per_tensor", "sharded_inf_vs_p2", "sharded_vs_hand_written"):
        assert statuses[key] in ("PASS", "FAIL"), result.stdout
    judged = next(line for line in result.stdout.splitlines() if line.startswith("[") and "sharded_tiny_per_tensor" in line)
    assert all(layout in judged for layout in LAYOUTS), judged


def test_layouts_flag_selects_the_sharded_layouts():
    """``--layouts`` (or ``--layout``) picks the sharded runs' layouts; an unknown one is a usage error."""
    from distclip._tools import cli

    def config(*args):
        return cli._bench_config(cli._parser().parse_args(["bench", *args]))

    assert config().layouts == LAYOUTS
    assert config("--layouts", "separate").layouts == ("separate",)
    assert config("--layout", "fsdp2,views").layouts == ("fsdp2", "views")
    with pytest.raises(SystemExit):
        config("--layouts", "rows")
