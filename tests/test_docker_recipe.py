"""The Docker images' recipe, run where no Docker engine is.

- ``docker/install.sh cpu``, the one step of ``docker/Dockerfile.cpu`` that installs anything, runs in a fresh
  virtualenv, and the image's command (``distclip demo``) then runs from that virtualenv;
- ``docker/install.sh gpu`` refuses, with a clear message and before installing anything, an environment
  whose torch is not a CUDA build (the GPU recipe itself needs a CUDA image and cannot run here);
- ``docker/compose.cpu.yml``: both services' commands run here, with their environment, the service host names
  standing for this machine (127.0.0.1).

PyTorch's CPU index is out of reach here, so the CPU recipe runs with ``TORCH_INDEX_URL=`` and pip finds the
same pinned wheel (``torch==2.13.0+cpu``) through this machine's pip configuration.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_launch import JOB_VARIABLES, _free_port, _output, check_steps, wait_all

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 180


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, **extra}


def test_cpu_recipe_installs_into_a_fresh_virtualenv_and_the_demo_runs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_TIMEOUT_S)
    bin_dir = venv / "bin"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv), TORCH_INDEX_URL="")
    install = subprocess.run(["bash", "docker/install.sh", "cpu"], capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S, cwd=REPO, env=env)
    assert install.returncode == 0, _output(install)
    assert "distclip 0.1.0 on torch 2.13.0+cpu" in install.stdout.splitlines(), _output(install)

    # The image's CMD, from a directory without the checkout: the installed package, not the sources.
    demo = subprocess.run([str(bin_dir / "distclip"), "demo", "--steps", "2"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, cwd=tmp_path, env=env)
    assert demo.returncode == 0, _output(demo)
    assert "distclip demo: 2/2 steps OK (2 ranks, gloo, norm_type=2.0, max_norm=1.0)" in demo.stdout, _output(demo)
    located = subprocess.run([str(bin_dir / "python"), "-c", "import distclip; print(distclip.__file__)"],
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path, env=env)
    assert located.stdout.startswith(str(venv)), _output(located)
    assert "Failed to initialize NumPy" not in demo.stderr, _output(demo)


def test_gpu_recipe_refuses_a_torch_without_cuda():
    pytest.importorskip("torch")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the refusal is for CPU builds")
    result = subprocess.run(["bash", "docker/install.sh", "gpu"], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, cwd=REPO, env=_env(PYTHON=sys.executable))
    assert result.returncode == 1, _output(result)
    assert result.stderr.strip() == (
        f"docker/install.sh: gpu: torch {torch.__version__} in {sys.executable} is not a CUDA build; the gpu "
        "recipe needs a CUDA PyTorch image (docker/Dockerfile.gpu); use 'cpu' here"
    ), _output(result)
    assert "pip install" not in result.stdout, _output(result)


def test_install_script_without_a_recipe_prints_its_usage():
    result = subprocess.run(["bash", "docker/install.sh"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (result.returncode, result.stderr) == (2, "usage: docker/install.sh cpu|gpu\n"), _output(result)


def test_the_compose_job_runs_its_two_nodes(tmp_path):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker" / "compose.cpu.yml").read_text())
    services = compose["services"]
    assert sorted(services) == ["node0", "node1"]
    for name, service in services.items():
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cpu"}, name
        assert service["hostname"] == name
    # The images' working directory holds the checkout, so the command's paths are the repository's.
    assert "WORKDIR /opt/distclip\nCOPY . .\n" in (REPO / "docker" / "Dockerfile.cpu").read_text()

    port = str(_free_port())
    hosts = {f"{name}:29500": f"127.0.0.1:{port}" for name in services} | {name: "127.0.0.1" for name in services}
    nodes = []
    for name in ("node1", "node0"):  # the later service first: it waits for node0's rendezvous store
        service = services[name]
        environment = {key: hosts.get(str(value), str(value)) for key, value in service["environment"].items()}
        nodes.append(subprocess.Popen(service["command"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO, env=_env(**environment)))
    results = wait_all(nodes, RUN_TIMEOUT_S)
    output = _output(*results)
    assert [r.returncode for r in results] == [0, 0], output
    world = sum(int(services[name]["environment"]["NPROC_PER_NODE"]) for name in services)
    steps = int(services["node0"]["command"][services["node0"]["command"].index("--steps") + 1])
    check_steps("".join(r.stdout for r in results), output, world=world, steps=steps, all_ranks=False)


def test_docker_files_name_the_recipe():
    # Both images install through install.sh alone, and the CPU image runs the demo by default.
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert [line for line in cpu.splitlines() if line.startswith("RUN")] == ["RUN bash docker/install.sh cpu"]
    assert 'CMD ["distclip", "demo"]' in cpu.splitlines()
    assert "RUN bash docker/install.sh gpu" in gpu.splitlines()
