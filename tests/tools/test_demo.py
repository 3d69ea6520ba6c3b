"""``distclip demo`` run for real, as a user runs it: a subprocess that starts its own ranks, or under torchrun."""

import os
import re
import subprocess
import sys

import pytest

# A run that does not finish in this time is a hang, and fails the test.
TIMEOUT_S = 180
STEP_LINE = re.compile(
    r"^step (\d+)/(\d+)  norm (\S+)  coef (\S+)  ref (\S+)  rel\.err (\S+)  (.*)$", re.MULTILINE
)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def run(*args: str) -> subprocess.CompletedProcess:
    """``python <args>`` outside any torchrun world (so that the demo spawns its own ranks), with a timeout."""
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False
    )


def assert_all_ok(result: subprocess.CompletedProcess, steps: int, summary: str) -> list[tuple[str, ...]]:
    """Exit status 0, ``steps`` step lines, each OK, and the summary line; returns the step lines' fields."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    lines = STEP_LINE.findall(result.stdout)
    numbers = [(int(step), int(total)) for step, total, *_ in lines]
    assert numbers == [(s, steps) for s in range(1, steps + 1)], output
    assert all(fields[-1] == "OK" for fields in lines), output
    assert summary in result.stdout.splitlines(), output
    return lines


@pytest.mark.parametrize(
    "nproc, norm_type, steps, summary_norm_type",
    [(2, "2", 3, "2.0"), (2, "inf", 3, "inf"), (2, "-inf", 2, "-inf"), (4, "2", 2, "2.0")],
)
def test_demo_spawns_ranks_and_every_step_is_ok(nproc, norm_type, steps, summary_norm_type):
    result = run("-m", "distclip", "demo", "--nproc", str(nproc), "--norm-type", norm_type, "--steps", str(steps))
    settings = f"{nproc} ranks, gloo, norm_type={summary_norm_type}, max_norm=1.0"
    lines = assert_all_ok(result, steps, f"distclip demo: {steps}/{steps} steps OK ({settings})")
    if norm_type == "2":  # the default max_norm really clips
        assert float(lines[0][3]) < 1.0, result.stdout


def test_demo_under_torchrun_runs_as_its_ranks():
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "distclip", "demo",
                 "--steps", "2")
    assert_all_ok(result, 2, "distclip demo: 2/2 steps OK (2 ranks, gloo, norm_type=2.0, max_norm=1.0)")


def test_demo_exits_nonzero_with_the_error_when_a_rank_raises():
    # p = 0 counts nonzero entries: it has no sharded meaning, and distclip raises on every rank. The command line
    # refuses it before starting any rank (tests/tools/test_cli.py), so the demo is called past the command line here.
    result = run("-c", "from distclip._tools import demo; raise SystemExit(demo.run(demo.Config(norm_type=0.0, steps=2)))")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed: ValueError: distclip: norm_type=0.0 has no sharded meaning" in result.stderr, result.stderr
    assert "steps OK" not in result.stdout
