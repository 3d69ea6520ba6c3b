"""The documentation site: it builds with warnings as errors, and its quickstart runs as written.

- ``mkdocs build --strict`` (MkDocs Material, mkdocstrings for the API reference from the docstrings): a broken
  link, a page missing from the nav, a docstring the parser cannot read or an object that does not exist fails
  the build, and this test.
- Every ```bash``` block of ``docs/quickstart.md`` is one of the commands below, and runs here exactly as
  written (``bash -c``), in order, from the repository root, in a fresh virtualenv whose only setup is the
  page's own install command; every ```python``` block then runs in that virtualenv too.
- Every ```python``` block of the other pages that opens with ``# <name>.py: <command>`` is a complete script:
  it is saved as ``<name>.py`` and ``<command>`` runs as written (the part before any "(or ...)"), once. Those
  that import Accelerate, Lightning, Transformers or DeepSpeed are skipped where it is not installed. On the pages
  of ``COMPLETE_PAGES`` every ```python``` block is such a script.
- Output shown in the docs comes from the code: a plain ``` block right after a command's or a script's block
  (nothing but prose between them) shows lines it prints, each exactly, ``...`` standing for lines or parts of a
  line left out.

The quickstart and the guide scripts are independent (each its own virtualenv or directory, torchrun picks its
own ports), so they run ahead of their tests, two side by side (``_jobs.Ahead``); each test then checks its own
run's output. The quickstart's virtualenv, once its test passed, is handed to the Docker recipe's test
(``virtualenvs`` in ``conftest.py``).
"""

import html
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from _jobs import Ahead, output, run
from _train_lm import check_steps

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
# Pages whose every python block is a script the tests run (the other pages' blocks are one-line comparisons
# and fragments of a layout, shown beside a script that runs).
COMPLETE_PAGES = ("clipper.md", "deepspeed.md", "fsdp1.md", "fsdp2.md", "torchrun.md", "accelerate.md",
                  "lightning.md", "transformers.md", "quickstart.md")
NUMPY_WARNING = "Failed to initialize NumPy"
# torch 2.13's gloo worker threads outlive destroy_process_group(), and one that releases a tensor while Python
# shuts down aborts that process with this message, after the script's work is done. Every script ends with
# distclip.shutdown.exit_cleanly() for this reason, so each runs once: an abort fails the test.
TORCH_TEARDOWN_ABORT = "terminate called without an active exception"
JOB_VARIABLES = ("VIRTUAL_ENV", "PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def shown_output(path: Path, code: str) -> str | None:
    """The plain block that follows the block whose body is ``code`` on the page at ``path`` (only prose between
    them), or None."""
    blocks = FENCE.findall(path.read_text())
    for (lang, body), (next_lang, next_body) in zip(blocks, blocks[1:]):
        if lang and body.strip() == code.strip():
            return next_body if not next_lang else None
    return None


def missing_lines(shown: str, printed: str) -> list[str]:
    """The lines of ``shown`` that ``printed`` does not contain: each shown line must be a printed line, ``...``
    standing for any text within a line; a line of only ``...`` stands for lines left out."""
    lines = printed.splitlines()
    missing = []
    for line in shown.splitlines():
        if line.strip() in ("", "..."):
            continue
        pattern = re.compile(".*".join(map(re.escape, line.split("..."))))
        if not any(pattern.fullmatch(printed_line) for printed_line in lines):
            missing.append(line)
    return missing


def _scripts():
    for page in sorted((REPO / "docs").glob("*.md")):
        for body in _blocks(page, "python"):
            header = SCRIPT_HEADER.match(body)
            if header:
                name, command = header.groups()
                yield pytest.param(name, command, body, shown_output(page, body), id=f"{page.stem}:{name}")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}


def _optional(body: str) -> list[str]:
    """The optional frameworks a script imports."""
    return [module for module in OPTIONAL if re.search(rf"^(from|import) {module}\b", body, re.MULTILINE)]


# The runs, one per test, each in the test's own directory: they return what the test checks.


def _quickstart(directory: Path):
    """The quickstart's commands in order, in a fresh virtualenv, stopping at the first that fails, then its
    python blocks there: the virtualenv, the commands' results and the blocks'."""
    venv = directory / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)], RUN_TIMEOUT_S)
    assert created.returncode == 0, output(created)
    env = _clean_env()
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv))
    commands = []
    for index, command in enumerate(QUICKSTART_COMMANDS):
        commands.append(run(["bash", "-c", command], INSTALL_TIMEOUT_S if index == 0 else RUN_TIMEOUT_S, cwd=REPO,
                            env=env))
        if commands[-1].returncode != 0:
            return venv, commands, []
    blocks = [run([str(venv / "bin" / "python"), "-c", block], RUN_TIMEOUT_S, cwd=directory, env=env)
              for block in _blocks(QUICKSTART, "python")]
    return venv, commands, blocks


def _guide_script(directory: Path, name: str, command: str, body: str, shown: str | None):
    if any(importlib.util.find_spec(module) is None for module in _optional(body)):
        return None  # its test skips
    (directory / name).write_text(body)
    return run(["bash", "-c", command], RUN_TIMEOUT_S, cwd=directory, env=_clean_env())


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    ahead = Ahead(request, tmp_path_factory, {
        "test_quickstart_runs_as_written": _quickstart,
        "test_guide_script_runs_as_written": _guide_script,
    })
    yield ahead
    ahead.close()


def test_site_builds_with_warnings_as_errors(tmp_path):
    site = tmp_path / "site"
    result = run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(site)],
        BUILD_TIMEOUT_S, cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    if "No module named mkdocs" in result.stderr:
        pytest.fail('the docs need MkDocs: python -m pip install -e ".[docs]"')
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("distclip.clip_grad_norm_", "distclip.clip_module_grad_norm_", "distclip.GradClipper",
                 "distclip.integrations.deepspeed.attach", "distclip.integrations.lightning.GradClipperCallback"):
        assert f'id="{name}"' in api, name
    # The docstrings' LaTeX (single backticks) is math, not code: MathML, and no LaTeX left in a code span.
    assert api.count("<math ") >= 9, "the API reference renders fewer formulas than its docstrings hold"
    latex_code = [c for c in re.findall(r"<code>([^<]*)</code>", api) if re.search(r"\\[A-Za-z]{2,}|\\\|", c)]
    assert not latex_code, latex_code
    # Signatures whole, one parameter a line where long: no line wider than mkdocs.yml's line_length.
    signatures = re.findall(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', api, re.DOTALL)
    assert len(signatures) >= 20, len(signatures)
    for signature in signatures:
        text = html.unescape(re.sub(r"<[^>]+>", "", signature))
        assert max(map(len, text.splitlines())) <= 72, text
    assert (site / "img" / "bench.png").is_file() and 'src="../img/bench.png"' in (
        site / "benchmarks" / "index.html"
    ).read_text()


def test_quickstart_shows_the_readme_install_command_and_only_the_tested_commands():
    commands = [body.strip() for body in _blocks(QUICKSTART, "bash")]
    assert commands == list(QUICKSTART_COMMANDS)
    readme_commands = [body.strip() for body in _blocks(REPO / "README.md", "bash")]
    assert readme_commands[0] in commands


# pytest-timeout's net for the quickstart, above its own steps' timeouts (the install; the virtualenv, the other
# commands and the python blocks): sharing the cores with the guide scripts beside it, it can outlast the default.
QUICKSTART_STEPS = len(QUICKSTART_COMMANDS) + len(_blocks(QUICKSTART, "python"))


@pytest.mark.timeout(INSTALL_TIMEOUT_S + RUN_TIMEOUT_S * QUICKSTART_STEPS)
def test_quickstart_runs_as_written(runs, request, virtualenvs):
    venv, results, block_results = runs.take(request)
    bin_dir = venv / "bin"
    for index, ((command, expected), result) in enumerate(zip(QUICKSTART_COMMANDS.items(), results)):
        context = f"$ {command}\nexit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 0, context
        assert expected in result.stdout.splitlines(), context
        # The install brings what torch needs to import quietly: the demo prints only its own lines.
        assert NUMPY_WARNING not in result.stderr, context
        shown = shown_output(QUICKSTART, command)
        if shown is not None:
            missing = missing_lines(shown, result.stdout)
            assert not missing, f"docs/quickstart.md shows lines not printed: {missing}\n{context}"
        if "train_lm.py --layout fsdp2 --steps 5" in command:  # the launch page shows the same run's first lines
            shown = FENCE.findall((REPO / "docs" / "launch.md").read_text())[0][1]
            assert shown.startswith("train_lm: layout fsdp2"), shown
            missing = missing_lines(shown, result.stdout)
            assert not missing, f"docs/launch.md shows lines not printed: {missing}\n{context}"
        if index == 0:  # the rest must run on what this command installed
            assert (bin_dir / "distclip").is_file() and (bin_dir / "torchrun").is_file(), context
        if "train_lm.py" in command:  # rank 0's lines: every step, a finite loss, the first norm the reference's
            check_steps(result.stdout, context, steps=5, all_ranks=False)
    assert len(results) == len(QUICKSTART_COMMANDS)

    blocks = _blocks(QUICKSTART, "python")
    assert len(block_results) == len(blocks)
    for block, result in zip(blocks, block_results):
        assert result.returncode == 0, f"{block}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    virtualenvs.keep("quickstart", venv)


def test_every_python_block_of_the_complete_pages_is_a_script():
    fragments = [(page, body.splitlines()[0]) for page in COMPLETE_PAGES if page != "quickstart.md"
                 for body in _blocks(REPO / "docs" / page, "python") if not SCRIPT_HEADER.match(body)]
    assert not fragments, f"blocks that are not complete scripts (no '# name.py: command' line): {fragments}"


def test_shown_output_is_checked_line_by_line():
    printed = "step 1/2  norm 1.5  OK\nstep 2/2  norm 1.25  OK\n{'a': '1', 'b': '2', 'c': '3'}\n"
    assert missing_lines("step 1/2  norm 1.5  OK\n...\n{'a': '1', ..., 'c': '3'}", printed) == []
    assert missing_lines("step 1/2  norm 1.6  OK\nstep 2/2  norm 1.25  OK", printed) == ["step 1/2  norm 1.6  OK"]
    assert missing_lines("step 1/2", printed) == ["step 1/2"]  # a whole line, not a part of one


@pytest.mark.parametrize("name, command, body, shown", list(_scripts()))
def test_guide_script_runs_as_written(runs, request, name, command, body, shown):
    for module in _optional(body):
        pytest.importorskip(module)
    result = runs.take(request)
    context = f"$ {command}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, context
    assert TORCH_TEARDOWN_ABORT not in result.stderr, context
    if shown is not None:
        missing = missing_lines(shown, result.stdout)
        assert not missing, f"the page shows lines the script did not print: {missing}\n{context}"


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
