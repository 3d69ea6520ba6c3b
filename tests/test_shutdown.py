"""``distclip.shutdown.exit_cleanly``: what it does in a real process, and that every distributed script ends with it.

torch 2.13's gloo worker threads can abort a finished process as Python shuts down (``terminate called without an
active exception``, seen in about 1 run in 8 of a small DDP script on 2 processes), which fails a torchrun job that did
all its work. The abort is a race, so no single run shows it; what is checked is that the helper ends a process
that used a gloo group with the status it is given, its output flushed and its group destroyed, and that the
guides' scripts, ``distclip demo`` and the launch scripts all end through it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
SCRIPT = """
import logging, sys
import torch, torch.distributed as dist
from distclip.shutdown import exit_cleanly

logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
tensor = torch.ones(4)
dist.all_reduce(tensor)
logging.info("logged %s", tensor.sum().item())
print("printed", end="")  # no newline: only a flush writes it
sys.stderr.write("stderr")
import atexit
atexit.register(print, "atexit ran")  # os._exit skips it
exit_cleanly(int(sys.argv[2]))
"""


@pytest.mark.parametrize("status", [0, 3])
def test_exit_cleanly_flushes_and_exits_with_the_status(tmp_path, status):
    log = tmp_path / "log.txt"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(status)], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == status, output
    assert result.stdout == "printed" and result.stderr == "stderr", output
    assert log.read_text() == "INFO:root:logged 4.0\n", output


def test_exit_cleanly_destroys_the_process_group(tmp_path):
    script = SCRIPT.replace("exit_cleanly(int(sys.argv[2]))", """
import os
import distclip.shutdown as shutdown
real_exit = os._exit
def checked_exit(status):
    sys.stdout.write(f" initialized={dist.is_initialized()}")
    sys.stdout.flush()
    real_exit(status)
shutdown.os._exit = checked_exit
exit_cleanly(0)
""")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "log.txt"), "0"], capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0 and result.stdout == "printed initialized=False", result.stdout + result.stderr


# A script that starts processes or a process group: torch.distributed, or a framework that sets one up.
DISTRIBUTED = re.compile(r"^# \w+\.py: .*(torchrun|accelerate launch)|^(import|from) (torch\.distributed|lightning|"
                         r"transformers|accelerate|deepspeed)\b", re.MULTILINE)


def _distributed_doc_scripts():
    fence = re.compile(r"^```python\n(# \w+\.py: .+?\n.*?)^```$", re.MULTILINE | re.DOTALL)
    for page in sorted((REPO / "docs").glob("*.md")):
        for body in fence.findall(page.read_text()):
            if DISTRIBUTED.search(body):
                yield pytest.param(body, id=f"{page.stem}:{body.split(':', 1)[0][2:]}")


@pytest.mark.parametrize("body", list(_distributed_doc_scripts()))
def test_every_distributed_guide_script_ends_with_exit_cleanly(body):
    assert "from distclip.shutdown import exit_cleanly" in body, body
    last = body.rstrip().splitlines()[-1]
    assert last.strip().startswith("exit_cleanly("), f"the script's last line is {last!r}, not exit_cleanly()"


@pytest.mark.parametrize("path", ["launch/train_lm.py", "launch/deepspeed/train.py"])
def test_launch_scripts_end_with_exit_cleanly(path):
    source = (REPO / path).read_text()
    assert re.search(r'^if __name__ == "__main__":\n(    #.*\n)*    exit_cleanly\(main\(\)\)', source, re.MULTILINE), path


def test_demo_ranks_end_with_exit_cleanly():
    # Spawned ranks and torchrun ranks both: each a call of exit_cleanly at the end of its function.
    from distclip._tools import demo as _demo

    source = Path(_demo.__file__).read_text()  # wherever the demo module lives
    for function in (_demo._spawned_rank, _demo._run_torchrun_rank):
        body = source.split(f"def {function.__name__}(", 1)[1].split("\ndef ", 1)[0]
        assert body.rstrip().splitlines()[-1].strip().startswith("exit_cleanly("), function.__name__
