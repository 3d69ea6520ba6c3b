"""The ``distclip`` command line's own checks: ``--version``, and demo flags refused before any rank starts.

Each bad flag is refused by argparse (exit status 2) with a message in the command line's terms, so ``main`` never
reaches the demo, which is where ranks are spawned: the in-process calls below return within the parse. One real
``python -m distclip`` run checks the same from a user's shell, and that it exits before a rank could start.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

import distclip
from distclip._tools.cli import main

TIMEOUT_S = 60
# The demo's ranks take seconds to start; a refused flag is answered in the time it takes to import torch.
REFUSAL_S = 15


def refused(capsys, *argv: str) -> str:
    """``distclip <argv>`` in this process: argparse's exit status 2, nothing printed on stdout; its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    assert captured.out == "", captured
    return captured.err


def test_version_prints_distclips_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"distclip {distclip.__version__} (torch {torch.__version__})\n"


@pytest.mark.parametrize("value", ["-1", "nan", "-inf", "-0.5"])
def test_demo_refuses_a_max_norm_the_sharded_clip_refuses(capsys, value):
    err = refused(capsys, "demo", "--max-norm", value)
    assert f"argument --max-norm: must be a non-negative number (inf: never clip), got '{value}'" in err, err


@pytest.mark.parametrize("value", ["0", "nan", "-2"])
def test_demo_refuses_a_norm_type_without_sharded_meaning(capsys, value):
    err = refused(capsys, "demo", "--norm-type", value)
    assert f"argument --norm-type: must be a number > 0, inf or -inf, got '{value}'" in err, err
    assert "group=None" not in err, err  # library advice, meaningless on the command line


@pytest.mark.parametrize("flag", ["--max-norm", "--norm-type"])
def test_demo_refuses_a_non_number(capsys, flag):
    assert f"argument {flag}: must be a " in refused(capsys, "demo", flag, "one")


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl without GPUs is what is refused")
def test_demo_refuses_nccl_without_gpus_and_suggests_gloo(capsys):
    err = refused(capsys, "demo", "--backend", "nccl")
    assert "nccl needs CUDA GPUs" in err and "use --backend gloo" in err, err


def test_a_refused_flag_exits_before_any_rank_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "distclip", "demo", "--max-norm", "-1"], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=env)
    elapsed = time.monotonic() - start
    output = f"exit {result.returncode} after {elapsed:.1f} s\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2 and result.stdout == "", output
    assert result.stderr.splitlines()[-1] == (
        "distclip demo: error: argument --max-norm: must be a non-negative number (inf: never clip), got '-1'"
    ), output
    assert "rank" not in result.stderr and "SIGTERM" not in result.stderr, output
    assert elapsed < REFUSAL_S, output
