"""Real multi-process worlds for the tests: N gloo ranks on 127.0.0.1, started once and reused.

``World(n).run(fn, *args)`` calls ``fn(*args)`` on every rank (``fn`` must be a module-level function) and
returns each rank's result, or its exception. A call that does not finish within its timeout is a hang: the
world is killed and the call raises ``TimeoutError`` naming the ranks that did not answer.
"""

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

# Collectives inside a task give up after this; the harness's own timeout is above it.
COLLECTIVE_TIMEOUT_S = 30
TASK_TIMEOUT_S = 60


class RankError(Exception):
    """An exception that could not be sent back from a rank as itself."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            outcome = fn(*args)
        except Exception as err:  # sent back to the test, which decides whether it was expected
            outcome = err
            err.__traceback_text__ = traceback.format_exc()
        try:
            results.put((rank, outcome))
        except Exception:  # an unpicklable result or exception
            results.put((rank, RankError(f"rank {rank}: {outcome!r}")))
    dist.destroy_process_group()


def answers(target, world_size: int, args: tuple, ranks: set[int], timeout: float = TASK_TIMEOUT_S) -> dict:
    """Start ``world_size`` fresh spawned processes ``target(rank, world_size, port, *args, results)`` (each makes
    its own process group on ``port``) and return ``{rank: answer}`` for ``ranks``, where each process puts
    ``(rank, *answer)`` on ``results``. Every process is joined, or killed, before it returns; ranks that give
    no answer within ``timeout`` raise ``TimeoutError`` naming them (a hang)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, *args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    got: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + timeout
        while not ranks <= set(got):
            rank, *answer = results.get(timeout=max(0.1, deadline - time.monotonic()))
            got[rank] = tuple(answer)
    except queue.Empty:
        raise TimeoutError(f"ranks {sorted(ranks - set(got))} gave no answer within {timeout} s (a hang)") from None
    finally:
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
    return {r: got[r] for r in ranks}


class World:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.alive = True

    def outcomes(self, fn, *args, timeout: float = TASK_TIMEOUT_S) -> list:
        """``fn(*args)`` on every rank: the list, by rank, of each return value or raised exception."""
        assert self.alive, "this world was closed after a hang"
        for q in self._tasks:
            q.put((fn, args))
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            try:
                rank, outcome = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(got))
                self.close()
                raise TimeoutError(
                    f"{fn.__name__}: ranks {missing} of {self.world_size} did not finish within {timeout}s (a hang)"
                ) from None
            got[rank] = outcome
        return [got[r] for r in range(self.world_size)]

    def run(self, fn, *args, timeout: float = TASK_TIMEOUT_S) -> list:
        """``fn(*args)`` on every rank; the return values by rank. Any rank's exception fails the call."""
        outcomes = self.outcomes(fn, *args, timeout=timeout)
        errors = [(r, o) for r, o in enumerate(outcomes) if isinstance(o, BaseException)]
        if errors:
            text = "\n".join(f"rank {r}: {getattr(e, '__traceback_text__', repr(e))}" for r, e in errors)
            raise AssertionError(f"{fn.__name__} raised on {len(errors)} rank(s):\n{text}")
        return outcomes

    def close(self) -> None:
        if self.alive:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self.alive = False


class Worlds:
    """One live world per size, made on first use and remade after a hang."""

    def __init__(self):
        self._worlds: dict[int, World] = {}

    def __call__(self, world_size: int) -> World:
        world = self._worlds.get(world_size)
        if world is None or not world.alive:
            world = self._worlds[world_size] = World(world_size)
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
