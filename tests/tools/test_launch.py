"""The launch scripts of ``launch/`` run for real, each for a few steps on CPU processes (gloo).

- ``launch/torchrun_single_node.sh`` (``torchrun --standalone``, 2 processes) for each layout of
  ``launch/train_lm.py``: DDP, FSDP1, FSDP2, and DeepSpeed where it is installed;
- ``launch/torchrun_multi_node.sh`` as two nodes on this machine: two torchrun agents (``--nnodes 2``, one
  process each) that meet in a c10d rendezvous on 127.0.0.1;
- ``launch/slurm.sbatch`` run by bash as Slurm would run it, with the variables Slurm sets, and stand-ins for
  the two Slurm commands it calls: ``scontrol show hostnames`` (this machine plays every node) and ``srun``
  (starts the command once per node, here, with the per-task variables). The stand-in records its arguments,
  so the test checks the exact ``torchrun`` command line the script builds, and then that command runs;
- ``launch/deepspeed/run.sh launch/train_lm.py --layout deepspeed``: the DeepSpeed launcher with its hostfile.

Every run must print every step on every rank, with a finite loss and the same norm bits on every rank, and
its first step must match a float64 reference computed here from the same model and batches: the first norm
is the norm of the gradient averaged over the 2 ranks, whatever the layout and the launcher (``_train_lm``).

The launches are independent (each its own ports and directory), so they run ahead of their tests, two side by
side (``_jobs.Ahead``); each test then checks its own launch's output.
"""

import importlib.util
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from _jobs import JOB_VARIABLES, Ahead, free_port, output, run, start, wait_all
from _train_lm import REPO, STEPS, WORLD, check_steps

TIMEOUT_S = 180

requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install .[deepspeed])"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and not k.startswith("SLURM_")}
    return {**env, **extra}


# The launches, one per test: each runs in the test's own directory and returns what the test checks.


def _single_node(directory: Path, layout: str) -> subprocess.CompletedProcess:
    return run(["bash", "launch/torchrun_single_node.sh", "--layout", layout, "--steps", str(STEPS), "--all-ranks"],
               TIMEOUT_S, cwd=REPO, env=_env(NPROC_PER_NODE=str(WORLD)))


def _two_nodes(directory: Path) -> list[subprocess.CompletedProcess]:
    # Two "nodes" on this machine: one agent per node, one process each, a c10d rendezvous hosted by node 0.
    # Node 1 starts first, so it waits for node 0's store as a real late head node would make it.
    common = {"NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "NPROC_PER_NODE": "1"}
    command = ["bash", "launch/torchrun_multi_node.sh", "--layout", "fsdp2", "--steps", str(STEPS), "--all-ranks"]
    return wait_all([start(command, cwd=REPO, env=_env(NODE_RANK=str(node_rank), **common)) for node_rank in (1, 0)],
                    TIMEOUT_S)


def _stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


SLURM_ARGS = ["--layout", "fsdp1", "--steps", str(STEPS), "--all-ranks"]


def _slurm(directory: Path) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """The batch script's result, the arguments srun was given, and the rendezvous port."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    srun_log = directory / "srun.args"
    # scontrol show hostnames NODELIST: one line per node; every node of this job is this machine.
    _stand_in(bin_dir, "scontrol", (
        '[[ "$1 $2 $3" == "show hostnames $SLURM_JOB_NODELIST" ]] || { echo "scontrol stand-in: $*" >&2; exit 2; }\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done\n'
    ))
    # srun with --ntasks-per-node=1: the command once per node, each task with the variables srun sets.
    _stand_in(bin_dir, "srun", (
        'printf "%s\\n" "$@" > "$SRUN_LOG"\n'
        'while [[ "$1" == -* ]]; do shift; done\n'
        'pids=()\n'
        'for ((node = 0; node < SLURM_NNODES; node++)); do\n'
        '  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &\n'
        '  pids+=("$!")\n'
        'done\n'
        'status=0\n'
        'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done\n'
        'exit "$status"\n'
    ))
    port = str(free_port())
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SRUN_LOG=str(srun_log),
        # What Slurm sets in a batch job of 2 nodes (no GPUs), submitted from the repository root.
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="distclip-lm", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_SUBMIT_DIR=str(REPO), SLURMD_NODENAME="node01",
        NPROC_PER_NODE="1", RDZV_PORT=port,
    )
    workdir = directory / "spool"  # sbatch runs a copy of the script, from elsewhere
    workdir.mkdir()
    script = workdir / "slurm_script"
    script.write_text((REPO / "launch" / "slurm.sbatch").read_text())
    result = run(["bash", str(script), *SLURM_ARGS], TIMEOUT_S, cwd=workdir, env=env)
    return result, srun_log.read_text().splitlines() if srun_log.exists() else [], port


def _deepspeed_launcher(directory: Path) -> subprocess.CompletedProcess:
    return run(["bash", "launch/deepspeed/run.sh", "launch/train_lm.py", "--layout", "deepspeed", "--steps",
                str(STEPS), "--all-ranks"], TIMEOUT_S, cwd=REPO, env=_env(MASTER_PORT=str(free_port())))


@pytest.fixture(scope="module", autouse=True)
def launches(request, tmp_path_factory):
    ahead = Ahead(request, tmp_path_factory, {
        "test_torchrun_single_node_runs_each_layout": _single_node,
        "test_two_torchrun_agents_meet_as_two_nodes": _two_nodes,
        "test_slurm_script_runs_its_torchrun_command_on_every_node": _slurm,
        "test_deepspeed_launcher_runs_the_example": _deepspeed_launcher,
    })
    yield ahead
    ahead.close()


@pytest.mark.parametrize(
    "layout", ["ddp", "fsdp1", "fsdp2", pytest.param("deepspeed", marks=requires_deepspeed)]
)
def test_torchrun_single_node_runs_each_layout(launches, request, layout):
    result = launches.take(request)
    context = output(result)
    assert result.returncode == 0, context
    assert f"train_lm: layout {layout}, 2 ranks, gloo on cpu" in result.stdout, context
    check_steps(result.stdout, context)


def test_two_torchrun_agents_meet_as_two_nodes(launches, request):
    results = launches.take(request)
    context = output(*results)
    assert [r.returncode for r in results] == [0, 0], context
    # Each agent's output holds its own process's lines: one rank each, together ranks 0 and 1.
    assert all(len(set(re.findall(r"\(rank (\d)\)$", r.stdout, re.MULTILINE))) == 1 for r in results), context
    check_steps("".join(r.stdout for r in results), context)


def test_slurm_script_runs_its_torchrun_command_on_every_node(launches, request):
    result, srun_args, port = launches.take(request)
    context = output(result)
    assert result.returncode == 0, context
    assert srun_args == [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "4242", str(REPO / "launch" / "train_lm.py"),
        *SLURM_ARGS,
    ], context
    check_steps(result.stdout, context)


@requires_deepspeed
def test_deepspeed_launcher_runs_the_example(launches, request):
    result = launches.take(request)
    context = output(result)
    assert result.returncode == 0, context
    check_steps(result.stdout, context)


def test_slurm_script_outside_slurm_says_to_submit_it(tmp_path):
    # Run by hand, not by sbatch: no SLURM_* variable (``_env`` drops them), no scontrol or srun called.
    result = run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--steps", "1"], 30, cwd=tmp_path, env=_env())
    context = output(result)
    assert result.returncode == 2, context
    assert "SLURM_JOB_NODELIST is not set" in result.stderr and "sbatch launch/slurm.sbatch" in result.stderr, context
    assert "unbound variable" not in result.stderr and result.stdout == "", context
