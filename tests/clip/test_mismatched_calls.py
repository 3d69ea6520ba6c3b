"""Mismatched calls: ranks that make different calls of the same collective (norm_type, max_norm,
error_if_nonfinite, or get_total_norm beside a clip) all raise the same ``ValueError``, naming what differs on
which ranks, with no gradient changed, and the group still works afterwards. On real gloo groups with a short
timeout, so a hang would fail in seconds.
"""

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import distclip
from _tester import grad_params

SHORT_TIMEOUT = timedelta(seconds=3)


def _mismatch_rank(calls: list[dict]):
    """Each rank makes its own call (norm_type, max_norm, error flag, or get_total_norm instead of a clip) on
    a fresh group with a short timeout; returns (error type, message, grads unchanged?, follow-up norm)."""
    rank = dist.get_rank()
    group = dist.new_group(timeout=SHORT_TIMEOUT)
    call = calls[rank]
    params = grad_params([torch.full((3,), float(rank + 1))])
    before = params[0].grad.clone()
    try:
        if call["api"] == "total":
            distclip.get_total_norm([params[0].grad], call["norm_type"], group=group)
        else:
            distclip.clip_grad_norm_(params, call["max_norm"], call["norm_type"], call["error"], group=group)
        outcome = (None, "")
    except Exception as err:  # every rank must raise: checked by the test
        outcome = (type(err), str(err))
    unchanged = torch.equal(params[0].grad, before)
    follow_up = distclip.clip_grad_norm_(params, 1e9, 2.0, group=group).item()  # the group still works
    return (*outcome, unchanged, follow_up)


BASE = {"api": "clip", "norm_type": 2.0, "max_norm": 1.0, "error": False}


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"norm_type": math.inf}, ["norm_type is 2.0 on ranks [0, 1]; inf on ranks [2]"]),
        ({"max_norm": 0.5}, ["max_norm is 1.0 on ranks [0, 1]; 0.5 on ranks [2]"]),
        ({"error": True}, ["error_if_nonfinite is False on ranks [0, 1]; True on ranks [2]"]),
        ({"api": "total"}, ["max_norm is 1.0 on ranks [0, 1]; none (get_total_norm) on ranks [2]"]),
        ({"norm_type": 3.0, "max_norm": 2.0}, ["norm_type is 2.0", "max_norm is 1.0"]),
    ],
)
def test_mismatched_calls_raise_the_same_error_on_every_rank(worlds, change, expect):
    calls = [BASE, BASE, {**BASE, **change}]
    outcomes = worlds(3).run(_mismatch_rank, calls)
    messages = {message for _, message, _, _ in outcomes}
    assert len(messages) == 1, "every rank must raise the same error"
    for error_type, message, unchanged, follow_up in outcomes:
        assert error_type is ValueError and "made different calls" in message
        assert all(e in message for e in expect), message
        assert unchanged, "a mismatched call must not change any gradient"
        assert follow_up == pytest.approx(math.sqrt(3 * (1 + 4 + 9)))


def test_matching_calls_do_not_raise(worlds):
    outcomes = worlds(3).run(_mismatch_rank, [BASE] * 3)
    assert all(error_type is None for error_type, *_ in outcomes)
