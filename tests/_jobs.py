"""Subprocesses for the tests that run scripts, launchers and installs as a user would.

- ``start``/``wait_all``/``run``: every process in a session of its own, so that a timeout ends the whole tree
  (a launcher's ranks too, which would otherwise hold the pipes open and the test with them) and fails the test
  with the command and what it printed (:class:`TimedOut`).
- :class:`Ahead`: the jobs of a module's tests started before the tests reach them, two at a time. A launch of
  2 ranks keeps about 1.5 of this machine's 2 cores busy (much of it importing torch and the frameworks) and an
  install about one, so two side by side finish sooner than one after the other. Each job keeps its own
  timeouts, directory and ports; each test still asserts everything on its own job's result.
"""

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

# Variables of an enclosing torchrun/Slurm job that must not leak into the launched ones.
JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")
# Grace for the pipes to close once a timed-out process group is killed.
KILL_GRACE_S = 30


class TimedOut(AssertionError):
    """A command ran past its timeout; its process group was killed."""


_live: set[subprocess.Popen] = set()  # started by start(), not yet waited for by wait_all()
_live_lock = threading.Lock()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output(*results: subprocess.CompletedProcess) -> str:
    return "\n".join(f"$ {' '.join(map(str, r.args))}\nexit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                     for r in results)


def start(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` with text pipes for stdout and stderr, in a new session (its own
    process group, which :func:`wait_all` kills on a timeout)."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    with _live_lock:
        _live.add(process)
    return process


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Each process's result, all read side by side (no pipe can fill while another is read). At ``timeout`` s
    every process group still running is killed, and :class:`TimedOut` says which commands ran too long and shows
    everything they printed."""
    results: list[subprocess.CompletedProcess | None] = [None] * len(processes)

    def read(index: int, process: subprocess.Popen) -> None:
        stdout, stderr = process.communicate()
        results[index] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    readers = [threading.Thread(target=read, args=item, daemon=True) for item in enumerate(processes)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    late = [process for process in processes if process.poll() is None]
    for process in processes:  # leftovers of a finished leader too (a rank it did not wait for)
        _kill_group(process)
    for reader in readers:
        reader.join(KILL_GRACE_S)
    with _live_lock:
        _live.difference_update(processes)
    if late or any(reader.is_alive() for reader in readers):
        shown = [r if r is not None else subprocess.CompletedProcess(p.args, p.returncode, "(unread)", "(unread)")
                 for p, r in zip(processes, results)]
        raise TimedOut(f"timed out after {timeout} s (process group killed): "
                       f"{[' '.join(map(str, p.args)) for p in late]}\n{output(*shown)}")
    return results


def run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``, except that a timeout
    kills the whole process group and raises :class:`TimedOut` with what the command printed."""
    return wait_all([start(args, **kwargs)], timeout)[0]


def _skipped(item: pytest.Item) -> bool:
    return any(mark.name == "skip" or (mark.name == "skipif" and mark.args and mark.args[0] is True)
               for mark in item.iter_markers())


class Ahead:
    """The jobs of a module's tests, started when the module starts, ``workers`` at a time, in the tests' order.

    ``jobs`` maps a test function's name to its job: ``job(directory, **params)``, with a fresh directory and the
    test's ``parametrize`` parameters, runs what the test checks and returns what the test asserts on. Every test
    of ``module`` that this session will run (``session.items``, not skipped by a ``skip``/``skipif`` mark) and has
    a job gets it submitted; in the test, ``take(request)`` returns the job's result or raises its exception.
    A test whose job was not submitted runs it in place.
    """

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 jobs: dict[str, Callable[..., Any]], workers: int = 2):
        self._jobs = jobs
        self._tmp = tmp_path_factory
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ahead")
        self._futures: dict[str, Future] = {}
        for item in request.session.items:
            if getattr(item, "module", None) is request.module and item.originalname in jobs and not _skipped(item):
                job, directory, params = self._job(item)
                self._futures[item.nodeid] = self._pool.submit(job, directory, **params)

    def _job(self, item: pytest.Item) -> tuple[Callable[..., Any], Path, dict[str, Any]]:
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        return self._jobs[item.originalname], self._tmp.mktemp(item.originalname, numbered=True), params

    def take(self, request: pytest.FixtureRequest) -> Any:
        future = self._futures.pop(request.node.nodeid, None)
        if future is None:
            job, directory, params = self._job(request.node)
            return job(directory, **params)
        return future.result()

    def close(self) -> None:
        """Drops the jobs not started, and ends those still running (their tests have ended: failed, or cut short
        by pytest-timeout or an interrupt), so the module's teardown does not wait for them."""
        for future in self._futures.values():
            future.cancel()
        with _live_lock:
            running = list(_live)
        for process in running:
            _kill_group(process)
        self._pool.shutdown(wait=True, cancel_futures=True)
