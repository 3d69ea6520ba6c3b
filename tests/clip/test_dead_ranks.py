"""A rank that dies or never calls: the survivors get distclip's ``RuntimeError`` (naming the group and the
failed collective) within the group's timeout, for the clip's all_reduce and for AGC's. The ranks are raw
gloo processes with their own short-timeout group (``_world.answers``), so a hang would fail in seconds.
"""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import distclip
from _tester import grad_params
from _world import answers

SHORT_TIMEOUT = timedelta(seconds=3)


def _lonely_rank(rank: int, world_size: int, port: int, fate: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=SHORT_TIMEOUT
    )
    params = grad_params([torch.ones(4)])
    distclip.clip_grad_norm_(params, 1.0, group=dist.group.WORLD)  # a first call that every rank makes
    if rank == world_size - 1:
        if fate == "dies":
            os._exit(3)
        time.sleep(3 * SHORT_TIMEOUT.total_seconds())  # alive, but never makes the second call
        results.put((rank, None, 0.0))
        return
    start = time.monotonic()
    try:
        distclip.clip_grad_norm_(params, 1.0, group=dist.group.WORLD)
        results.put((rank, "returned", time.monotonic() - start))
    except Exception as err:  # the survivors' error is what the test checks
        results.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - start))


@pytest.mark.slow
@pytest.mark.parametrize("fate", ["dies", "never_calls"])
def test_survivors_get_a_clear_error_in_bounded_time(fate):
    world_size = 3
    survivors = answers(_lonely_rank, world_size, (fate,), set(range(world_size - 1)))
    for outcome, elapsed in survivors.values():
        assert outcome.startswith("RuntimeError: distclip: the clip's all_reduce over a group of 3 ranks"), outcome
        assert "did not make the same call within the group's timeout" in outcome
        assert elapsed < 30, f"the error took {elapsed:.1f} s"


def _agc_lonely_rank(rank, world_size, port, results):
    from distclip._clip import reduction as _reduction

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=3))
    dist.all_reduce(torch.ones(1))  # a first collective that both make: gloo connects the ranks here
    if rank == 1:
        results.put((rank, "absent"))
        time.sleep(6)  # alive past the 3 s timeout, but never makes the call
        os._exit(0)
    try:
        _reduction.all_reduce_sum_(torch.ones(4, dtype=torch.float64), dist.group.WORLD)
        results.put((rank, "returned"))
    except Exception as err:  # what the survivor is told is what the test checks
        results.put((rank, f"{type(err).__name__}: {err}"))
    results.close()
    results.join_thread()  # the answer is sent before os._exit, which would drop what the queue still holds
    os._exit(0)  # the group is broken: leave without gloo's teardown


def test_agc_all_reduce_of_an_absent_rank_is_a_clear_error():
    (outcome,) = answers(_agc_lonely_rank, 2, (), {0})[0]
    assert outcome.startswith("RuntimeError: distclip: AGC's all_reduce of unit norms over a group of 2 ranks "
                              "failed on rank 0"), outcome
    assert "did not make the same call within the group's timeout" in outcome
