"""The documentation site: it builds with warnings as errors, and its quickstart runs as written.

- ``mkdocs build --strict`` (MkDocs Material, mkdocstrings for the API reference from the docstrings): a broken
  link, a page missing from the nav, a docstring the parser cannot read or an object that does not exist fails
  the build, and this test.
- Every ```bash``` block of ``docs/quickstart.md`` is one of the commands below, and runs here exactly as
  written (``bash -c``), in order, from the repository root, in a fresh virtualenv whose only setup is the
  page's own install command; every ```python``` block then runs in that virtualenv too.
- Every ```python``` block of the other pages that opens with ``# <name>.py: <command>`` is a complete script:
  it is saved as ``<name>.py`` and ``<command>`` runs as written (the part before any "(or ...)"). Those that
  import Accelerate, Lightning, Transformers or DeepSpeed are skipped where it is not installed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_launch import check_steps

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "docs" / "quickstart.md"
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 180
# The quickstart's commands, in order, and a line each must print.
QUICKSTART_COMMANDS = {
    "python -m pip install torch==2.13.0 -e . && distclip demo":
        "distclip demo: 5/5 steps OK (2 ranks, gloo, norm_type=2.0, max_norm=1.0)",
    "distclip demo --nproc 4 --norm-type inf --steps 3":
        "distclip demo: 3/3 steps OK (4 ranks, gloo, norm_type=inf, max_norm=1.0)",
    "torchrun --standalone --nproc-per-node 2 launch/train_lm.py --layout fsdp2 --steps 5":
        "train_lm: 5 steps done",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SCRIPT_HEADER = re.compile(r"# (\w+\.py): (.+?)(?: \(or .*\))?\n")
OPTIONAL = ("accelerate", "lightning", "transformers", "deepspeed")
# torch 2.13's gloo worker threads outlive destroy_process_group(), and one that releases a tensor while Python
# shuts down aborts that process with this message, after the script's work is done. Every script ends with
# distclip.shutdown.exit_cleanly() for this reason, so each runs once: an abort fails the test.
TORCH_TEARDOWN_ABORT = "terminate called without an active exception"
JOB_VARIABLES = ("VIRTUAL_ENV", "PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _scripts():
    for page in sorted((REPO / "docs").glob("*.md")):
        for body in _blocks(page, "python"):
            header = SCRIPT_HEADER.match(body)
            if header:
                name, command = header.groups()
                yield pytest.param(name, command, body, id=f"{page.stem}:{name}")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}


def test_site_builds_with_warnings_as_errors(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    if "No module named mkdocs" in result.stderr:
        pytest.fail('the docs need MkDocs: python -m pip install -e ".[docs]"')
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("distclip.clip_grad_norm_", "distclip.clip_module_grad_norm_", "distclip.GradClipper",
                 "distclip.integrations.deepspeed.attach", "distclip.integrations.lightning.GradClipperCallback"):
        assert f'id="{name}"' in api, name
    assert (site / "img" / "bench.png").is_file() and 'src="../img/bench.png"' in (
        site / "benchmarks" / "index.html"
    ).read_text()


def test_quickstart_shows_the_readme_install_command_and_only_the_tested_commands():
    commands = [body.strip() for body in _blocks(QUICKSTART, "bash")]
    assert commands == list(QUICKSTART_COMMANDS)
    readme_commands = [body.strip() for body in _blocks(REPO / "README.md", "bash")]
    assert readme_commands[0] in commands


def test_quickstart_runs_as_written(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_TIMEOUT_S)
    bin_dir = venv / "bin"
    env = _clean_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv))

    for index, (command, expected) in enumerate(QUICKSTART_COMMANDS.items()):
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO, env=env,
                                timeout=INSTALL_TIMEOUT_S if index == 0 else RUN_TIMEOUT_S)
        output = f"$ {command}\nexit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 0, output
        assert expected in result.stdout.splitlines(), output
        if index == 0:  # the rest must run on what this command installed
            assert (bin_dir / "distclip").is_file() and (bin_dir / "torchrun").is_file(), output
        if "train_lm.py" in command:  # rank 0's lines: every step, a finite loss, the first norm the reference's
            check_steps(result.stdout, output, steps=5, all_ranks=False)

    for block in _blocks(QUICKSTART, "python"):
        result = subprocess.run([str(bin_dir / "python"), "-c", block], capture_output=True, text=True, cwd=tmp_path,
                                env=env, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 0, f"{block}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("name, command, body", list(_scripts()))
def test_guide_script_runs_as_written(tmp_path, name, command, body):
    for module in OPTIONAL:
        if re.search(rf"^(from|import) {module}\b", body, re.MULTILINE):
            pytest.importorskip(module)
    (tmp_path / name).write_text(body)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path,
                            env=_clean_env(), timeout=RUN_TIMEOUT_S)
    output = f"$ {command}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    assert TORCH_TEARDOWN_ABORT not in result.stderr, output


def test_readme_job_example_sets_a_timeout_and_says_what_it_does():
    # gloo's default timeout is 30 minutes: a rank that never calls would block the others that long.
    readme = (REPO / "README.md").read_text()
    calls = [line for body in _blocks(REPO / "README.md", "python") for line in body.splitlines()
             if "init_process_group(" in line]
    assert calls, "the README shows no init_process_group call"
    for call in calls:
        seconds = re.search(r"timeout=datetime\.timedelta\(seconds=(\d+)\)", call)
        assert seconds, f"no timeout= in {call!r}"
        assert re.search(rf"raise distclip's `RuntimeError`[^.]*after {seconds[1]} s", readme, re.DOTALL), readme
