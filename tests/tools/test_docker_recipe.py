"""The Docker images' recipe, run where no Docker engine is.

- ``docker/install.sh cpu``, the one step of ``docker/Dockerfile.cpu`` that installs anything, runs in a
  virtualenv apart from the checkout's environment, and the image's command (``distclip demo``) then runs from
  that virtualenv, on the installed package and the torch installed there;
- ``docker/install.sh gpu`` refuses, with a clear message and before installing anything, an environment
  whose torch is not a CUDA build (the GPU recipe itself needs a CUDA image and cannot run here);
- ``docker/compose.cpu.yml``: both services' commands run here, with their environment, the service host names
  standing for this machine (127.0.0.1).

PyTorch's CPU index is out of reach here, so the CPU recipe runs with ``TORCH_INDEX_URL=`` and pip finds the
same pinned wheel (``torch==2.13.0+cpu``) through this machine's pip configuration. The virtualenv is the one the
quickstart's test (``tests/test_docs.py``) installed into, where that test ran and passed in this session
(``virtualenvs`` in ``conftest.py``): the recipe's pip then finds that same wheel's torch, and numpy, already
installed, and replaces the quickstart's editable distclip with the checkout's package. Run alone, it starts
from an empty virtualenv.

The recipe and the compose job are independent, so both run ahead of their tests, side by side (``_jobs.Ahead``).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _jobs import JOB_VARIABLES, Ahead, free_port, output, run, start, wait_all
from _train_lm import REPO, check_steps

INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 180


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, **extra}


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / "docker" / "compose.cpu.yml").read_text())


# The runs, one per test, each in the test's own directory: they return what the test checks.


def _cpu_recipe(directory: Path, virtualenvs) -> tuple[Path, str, list[subprocess.CompletedProcess]]:
    """The virtualenv, where it came from, and the results of the recipe, the demo and the import check."""
    venv = virtualenvs.take("quickstart")
    origin = "the quickstart's, handed on"
    if venv is None:
        venv, origin = directory / "venv", "new"
        created = run([sys.executable, "-m", "venv", str(venv)], RUN_TIMEOUT_S)
        assert created.returncode == 0, output(created)
    bin_dir = venv / "bin"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv), TORCH_INDEX_URL="")
    install = run(["bash", "docker/install.sh", "cpu"], INSTALL_TIMEOUT_S, cwd=REPO, env=env)
    if install.returncode != 0:
        return venv, origin, [install]
    # The image's CMD, from a directory without the checkout: the installed package, not the sources.
    demo = run([str(bin_dir / "distclip"), "demo", "--steps", "2"], RUN_TIMEOUT_S, cwd=directory, env=env)
    where = "import distclip, torch; print(distclip.__file__); print(torch.__file__)"
    located = run([str(bin_dir / "python"), "-c", where], RUN_TIMEOUT_S, cwd=directory, env=env)
    return venv, origin, [install, demo, located]


def _compose_job(directory: Path) -> list[subprocess.CompletedProcess]:
    services = _compose()["services"]
    port = str(free_port())
    hosts = {f"{name}:29500": f"127.0.0.1:{port}" for name in services} | {name: "127.0.0.1" for name in services}
    nodes = []
    for name in ("node1", "node0"):  # the later service first: it waits for node0's rendezvous store
        service = services[name]
        environment = {key: hosts.get(str(value), str(value)) for key, value in service["environment"].items()}
        nodes.append(start(service["command"], cwd=REPO, env=_env(**environment)))
    return wait_all(nodes, RUN_TIMEOUT_S)


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory, virtualenvs):
    ahead = Ahead(request, tmp_path_factory, {
        "test_cpu_recipe_installs_into_a_virtualenv_and_the_demo_runs": functools.partial(
            _cpu_recipe, virtualenvs=virtualenvs),
        "test_the_compose_job_runs_its_two_nodes": _compose_job,
    })
    yield ahead
    ahead.close()


# pytest-timeout's net above the steps' own timeouts (the virtualenv, the install, the demo, the import check): on
# a loaded machine the install alone can outlast the default.
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 3 * RUN_TIMEOUT_S)
def test_cpu_recipe_installs_into_a_virtualenv_and_the_demo_runs(runs, request):
    venv, origin, results = runs.take(request)
    install, *rest = results
    context = f"virtualenv {venv} ({origin})\n{output(*results)}"
    assert install.returncode == 0, context
    assert "distclip 0.1.0 on torch 2.13.0+cpu" in install.stdout.splitlines(), context
    demo, located = rest
    assert demo.returncode == 0, context
    assert "distclip demo: 2/2 steps OK (2 ranks, gloo, norm_type=2.0, max_norm=1.0)" in demo.stdout, context
    # distclip and torch both from the virtualenv: not the checkout's sources, not the checkout's environment.
    assert located.returncode == 0 and len(located.stdout.splitlines()) == 2, context
    assert all(line.startswith(str(venv)) for line in located.stdout.splitlines()), context
    assert "Failed to initialize NumPy" not in demo.stderr, context


def test_gpu_recipe_refuses_a_torch_without_cuda():
    pytest.importorskip("torch")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the refusal is for CPU builds")
    result = run(["bash", "docker/install.sh", "gpu"], RUN_TIMEOUT_S, cwd=REPO, env=_env(PYTHON=sys.executable))
    assert result.returncode == 1, output(result)
    assert result.stderr.strip() == (
        f"docker/install.sh: gpu: torch {torch.__version__} in {sys.executable} is not a CUDA build; the gpu "
        "recipe needs a CUDA PyTorch image (docker/Dockerfile.gpu); use 'cpu' here"
    ), output(result)
    assert "pip install" not in result.stdout, output(result)


def test_install_script_without_a_recipe_prints_its_usage():
    result = run(["bash", "docker/install.sh"], 60, cwd=REPO)
    assert (result.returncode, result.stderr) == (2, "usage: docker/install.sh cpu|gpu\n"), output(result)


def test_the_compose_job_runs_its_two_nodes(runs, request):
    services = _compose()["services"]
    assert sorted(services) == ["node0", "node1"]
    for name, service in services.items():
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cpu"}, name
        assert service["hostname"] == name
    # The images' working directory holds the checkout, so the command's paths are the repository's.
    assert "WORKDIR /opt/distclip\nCOPY . .\n" in (REPO / "docker" / "Dockerfile.cpu").read_text()

    results = runs.take(request)
    context = output(*results)
    assert [r.returncode for r in results] == [0, 0], context
    world = sum(int(services[name]["environment"]["NPROC_PER_NODE"]) for name in services)
    steps = int(services["node0"]["command"][services["node0"]["command"].index("--steps") + 1])
    check_steps("".join(r.stdout for r in results), context, world=world, steps=steps, all_ranks=False)


def test_docker_files_name_the_recipe():
    # Both images install through install.sh alone, and the CPU image runs the demo by default.
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert [line for line in cpu.splitlines() if line.startswith("RUN")] == ["RUN bash docker/install.sh cpu"]
    assert 'CMD ["distclip", "demo"]' in cpu.splitlines()
    assert "RUN bash docker/install.sh gpu" in gpu.splitlines()
