"""The collectives of the sharded calls: exactly one per ``clip_grad_norm_`` / ``get_total_norm`` with
``group=`` (none in ``clip_grads_with_norm_`` after it), none with ``group=None``; and ranks without gradients
(empty lists, ``grad=None``, a zero-element shard) still take part in it, so no rank is left waiting. See
``_sharded_cases``.
"""

import random

import pytest
import torch

from _sharded_cases import (
    INF,
    WORLD_SIZES,
    Case,
    FreshGroup,
    check_ok,
    clip,
    cut_empty_list_on_rank0,
    cut_round_robin,
    cut_uneven,
    logical_vector,
    run_sharded,
    total,
    total_then_scale,
)
from _tester import assert_bitwise, assert_grads_unchanged, reference_norm


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_exactly_one_collective_per_sharded_call(worlds, world_size):
    """clip_grad_norm_ and get_total_norm make exactly one collective in sharded mode, for finite p, inf,
    -inf, large p, also on a rank without grads (check_ok counts on every calling rank); the two-step
    get_total_norm + clip_grads_with_norm_ makes one in all, none of it in clip_grads_with_norm_, and gives
    the grads of clip_grad_norm_ bitwise."""
    pieces = cut_empty_list_on_rank0(logical_vector(seed=14), world_size, None)
    cases = []
    for p in [2.0, 0.5, INF, -INF, 8.0, 1e4]:
        ref = reference_norm([g for pc in pieces for g in pc], p)
        cases += [Case(pieces, p, 0.37 * ref, api=api, label="count")
                  for api in [clip, total, total_then_scale]]
    results = run_sharded(worlds(world_size), cases)
    for i in range(0, len(cases), 3):
        clipped, _, two_step = results[i:i + 3]
        for case, res in zip(cases[i:i + 3], results[i:i + 3]):
            check_ok(case, res)
        for r in range(world_size):
            assert two_step[r].extra["scale_comms"] == 0
            assert_grads_unchanged(clipped[r].grads, two_step[r].grads, f"{cases[i].what} rank {r}")


def test_no_collective_without_group(worlds):
    """group=None is a local clip on every rank: no collective, each rank its own norm (torch's dtype)."""
    pieces = cut_round_robin(logical_vector(seed=15), 2, None)
    cases = [Case(pieces, p, 0.5, api=api, group=None, label="local")
             for p in [2.0, INF] for api in [clip, total, total_then_scale]]
    for case, results in zip(cases, run_sharded(worlds(2), cases)):
        for r, res in enumerate(results):
            assert res.error is None and res.comms == 0, (case.what, res.error, res.comms)
            expected = torch.nn.utils.get_total_norm([g for g in pieces[r] if g is not None], case.norm_type)
            assert_bitwise(res.norm, expected, f"{case.what} rank {r}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_no_grads_anywhere_gives_zero_on_every_rank(worlds, world_size):
    """No rank has grads (empty lists and grad=None params): 0.0 (float64) on every rank, one collective."""
    pieces = [[] if r % 2 else [None] for r in range(world_size)]
    cases = [Case(pieces, p, 1.0, api=api, label="no grads")
             for p in [2.0, INF, -INF, 0.5, 100.0] for api in [clip, total]]
    for case, results in zip(cases, run_sharded(worlds(world_size), cases)):
        assert check_ok(case, results).item() == 0.0


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, -INF, 100.0], ids=repr)
def test_rank_with_zero_element_grad_takes_part(worlds, norm_type):
    """A rank whose only grad has zero elements (an empty FSDP shard: fewer elements than ranks) holds no
    values: it contributes nothing, and every rank gets the norm of the others' values. It must not fail on
    that rank alone while the others wait in the collective (a fresh group with a short timeout turns such a
    hang into an error here)."""
    values = logical_vector(seed=16)
    first, last = cut_uneven(values, 2, random.Random(16))
    pieces = [first, [torch.zeros(0)], last]
    case = Case(pieces, norm_type, 1.0, group=FreshGroup((0, 1, 2)), label="zero-element grad on rank 1")
    check_ok(case, run_sharded(worlds(3), [case], isolated=True)[0], ref=reference_norm(values, norm_type))
