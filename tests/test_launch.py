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
is the norm of the gradient averaged over the 2 ranks, whatever the layout and the launcher.
"""

import functools
import importlib.util
import math
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
STEPS = 3
WORLD = 2
# The first step's norm against the float64 reference: float32 gradients, reduced in different orders.
REL = 1e-5
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  norm (\S+)(?:  clipped)?(?:  \(rank (\d+)\))?$", re.MULTILINE)
# Variables of an enclosing torchrun/Slurm job that must not leak into the launched ones.
JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")

requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install .[deepspeed])"
)


def _example():
    spec = importlib.util.spec_from_file_location("train_lm", REPO / "launch" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def reference(world: int = WORLD) -> tuple[float, float]:
    """The first step's (loss, norm) in float64 on this process, for a world of ``world`` ranks: the default
    model and each rank's first batch as train_lm.py draws them; the loss is the mean of the ranks' losses, the
    gradient the mean of theirs (as DDP, FSDP and DeepSpeed average)."""
    example = _example()
    args = example.parse_args([])
    model, successor = example.build(args)
    model = model.double()
    losses = []
    for rank in range(world):
        tokens = example.synthetic_batch(example.rank_generator(args, rank), successor, args.batch, args.length)
        logits = model(tokens[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    loss = torch.stack(losses).mean()
    loss.backward()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return loss.item(), norm.item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and not k.startswith("SLURM_")}
    return {**env, **extra}


def _output(*results: subprocess.CompletedProcess) -> str:
    return "\n".join(f"$ {' '.join(map(str, r.args))}\nexit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                     for r in results)


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Each process's result, each waited for up to ``timeout`` s; any still running at the end is killed."""
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
    return results


def check_steps(stdout: str, context: str, world: int = WORLD, steps: int = STEPS, all_ranks: bool = True) -> None:
    """Every rank (``all_ranks``; else rank 0, which prints without a rank) printed steps 1..steps with a finite
    loss, all ranks the same norm bits at each step, and the first step matches :func:`reference`."""
    by_rank: dict[int, list[tuple[int, float, str]]] = {}
    for step, total, loss, norm, rank in STEP_LINE.findall(stdout):
        assert int(total) == steps, context
        by_rank.setdefault(int(rank or 0), []).append((int(step), float(loss), norm))
    assert sorted(by_rank) == list(range(world if all_ranks else 1)), context
    for rank_lines in by_rank.values():
        assert [step for step, _, _ in rank_lines] == list(range(1, steps + 1)), context
        assert all(math.isfinite(loss) for _, loss, _ in rank_lines), context
    for step in range(steps):
        norms = {rank_lines[step][2] for rank_lines in by_rank.values()}
        assert len(norms) == 1, f"step {step + 1}: the ranks printed different norms {norms}\n{context}"
    (_, loss, norm), *_ = by_rank[0]
    expected_loss, expected_norm = reference(world)
    assert math.isfinite(float(norm)) and float(norm) > 0, context
    assert math.isclose(loss, expected_loss, rel_tol=1e-3), f"loss {loss} != {expected_loss}\n{context}"
    assert math.isclose(float(norm), expected_norm, rel_tol=REL), f"norm {norm} != {expected_norm}\n{context}"


@pytest.mark.parametrize(
    "layout", ["ddp", "fsdp1", "fsdp2", pytest.param("deepspeed", marks=requires_deepspeed)]
)
def test_torchrun_single_node_runs_each_layout(layout):
    result = subprocess.run(
        ["bash", "launch/torchrun_single_node.sh", "--layout", layout, "--steps", str(STEPS), "--all-ranks"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=_env(NPROC_PER_NODE=str(WORLD)),
    )
    output = _output(result)
    assert result.returncode == 0, output
    assert f"train_lm: layout {layout}, 2 ranks, gloo on cpu" in result.stdout, output
    check_steps(result.stdout, output)


def test_two_torchrun_agents_meet_as_two_nodes():
    # Two "nodes" on this machine: one agent per node, one process each, a c10d rendezvous hosted by node 0.
    # Node 1 starts first, so it waits for node 0's store as a real late head node would make it.
    common = {"NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "NPROC_PER_NODE": "1"}
    command = ["bash", "launch/torchrun_multi_node.sh", "--layout", "fsdp2", "--steps", str(STEPS), "--all-ranks"]
    nodes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=_env(NODE_RANK=str(node_rank), **common))
        for node_rank in (1, 0)
    ]
    results = wait_all(nodes, TIMEOUT_S)
    output = _output(*results)
    assert [r.returncode for r in results] == [0, 0], output
    # Each agent's output holds its own process's lines: one rank each, together ranks 0 and 1.
    assert all(len(set(re.findall(r"\(rank (\d)\)$", r.stdout, re.MULTILINE))) == 1 for r in results), output
    check_steps("".join(r.stdout for r in results), output)


def _stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_runs_its_torchrun_command_on_every_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun_log = tmp_path / "srun.args"
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
    port = str(_free_port())
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SRUN_LOG=str(srun_log),
        # What Slurm sets in a batch job of 2 nodes (no GPUs), submitted from the repository root.
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="distclip-lm", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_SUBMIT_DIR=str(REPO), SLURMD_NODENAME="node01",
        NPROC_PER_NODE="1", RDZV_PORT=port,
    )
    workdir = tmp_path / "spool"  # sbatch runs a copy of the script, from elsewhere
    workdir.mkdir()
    script = workdir / "slurm_script"
    script.write_text((REPO / "launch" / "slurm.sbatch").read_text())
    args = ["--layout", "fsdp1", "--steps", str(STEPS), "--all-ranks"]
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                            cwd=workdir, env=env)
    output = _output(result)
    assert result.returncode == 0, output
    assert srun_log.read_text().splitlines() == [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "4242", str(REPO / "launch" / "train_lm.py"), *args,
    ], output
    check_steps(result.stdout, output)


@requires_deepspeed
def test_deepspeed_launcher_runs_the_example():
    result = subprocess.run(
        ["bash", "launch/deepspeed/run.sh", "launch/train_lm.py", "--layout", "deepspeed", "--steps", str(STEPS),
         "--all-ranks"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=_env(MASTER_PORT=str(_free_port())),
    )
    output = _output(result)
    assert result.returncode == 0, output
    check_steps(result.stdout, output)


def test_slurm_script_outside_slurm_says_to_submit_it(tmp_path):
    # Run by hand, not by sbatch: no SLURM_* variable (``_env`` drops them), no scontrol or srun called.
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--steps", "1"], capture_output=True,
                            text=True, timeout=30, cwd=tmp_path, env=_env())
    output = _output(result)
    assert result.returncode == 2, output
    assert "SLURM_JOB_NODELIST is not set" in result.stderr and "sbatch launch/slurm.sbatch" in result.stderr, output
    assert "unbound variable" not in result.stderr and result.stdout == "", output
