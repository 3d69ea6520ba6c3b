"""benchmarks/gpu_check.sh: its dry run passes on the CPU, and leaves docs/benchmarks.md alone.

The dry run is every CPU-runnable part of the GPU check: argument parsing, tests/clip/test_cuda.py's parity tests with
``DISTCLIP_TEST_DEVICE=cpu``, the sync-free check's logic on a one-rank gloo group, the bench on a tiny
configuration, and the docs step into a copy of docs/benchmarks.md. What needs a GPU (CUDA kernels, NCCL,
``torch.cuda.set_sync_debug_mode``) runs only when the script runs on one.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PAGE = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
TIMEOUT_S = 240


def _run(*args, timeout=TIMEOUT_S):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("DISTCLIP_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_dry_run_passes_and_writes_the_table_into_a_copy(tmp_path):
    page_before = PAGE.read_text()
    assert page_before.count(BEGIN) == 1 and page_before.count(END) == 1, "the page needs one gpu-check block"
    result = _run("--dry-run", "--out", str(tmp_path))
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    for n in (1, 2, 3):
        assert f"gpu_check: [{n}/3]" in result.stdout and (tmp_path / f"step{n}.log").is_file(), output
    assert "gpu_sync_check: OK" in result.stdout and "gpu_check: OK (cpu, dry run" in result.stdout, output
    copy = (tmp_path / "benchmarks.md").read_text()
    block = copy[copy.index(BEGIN):copy.index(END)]
    assert "| workload | dtype | p | variant |" in block and "| GradClipper sharded |" in block, block
    assert "A dry run on the CPU" in block, block
    assert copy.replace(block, "") == page_before.replace(page_before[page_before.index(BEGIN):page_before.index(END)], "")
    assert (tmp_path / "gpu_bench.json").is_file()
    assert PAGE.read_text() == page_before, "the dry run changed docs/benchmarks.md"


def test_bad_arguments_exit_2_with_usage():
    for args in (["--bogus"], ["--docs"]):
        result = _run(*args, timeout=30)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "gpu_check:" in result.stderr, (args, result.stderr)
    result = _run("--help", timeout=30)
    assert result.returncode == 0 and "--dry-run" in result.stdout, result.stdout
