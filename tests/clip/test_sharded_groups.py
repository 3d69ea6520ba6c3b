"""Process groups of the sharded calls: a sub-group from ``dist.new_group`` norms over its members' pieces
only (the other ranks do not call and keep their gradients), a rank outside the group gets ``ValueError``
without communicating, and ``group=dist.group.WORLD`` and a new group of every rank give bitwise the same
result. See ``_sharded_cases``.
"""

import random
from dataclasses import replace

import pytest

from _sharded_cases import (
    INF,
    WORLD,
    WORLD_SIZES,
    Case,
    check_ok,
    check_rank_raised,
    clip,
    clip_cases,
    cut_round_robin,
    cut_uneven,
    logical_vector,
    run_and_check,
    run_sharded,
    total,
)
from _tester import assert_bitwise, reference_norm


@pytest.mark.parametrize(
    "world_size,members", [(2, (1,)), (3, (0, 2)), (4, (0, 2)), (4, (1, 2, 3))], ids=lambda v: str(v)
)
def test_subgroup_norm_is_over_members_only(worlds, world_size, members):
    """A group from dist.new_group: the norm is over the members' pieces only; the other ranks do not call
    and keep their grads."""
    pieces = cut_uneven(logical_vector(seed=12), world_size, random.Random(12))
    member_values = [g for r in members for g in pieces[r]]
    cases = []
    for norm_type in [1.0, 2.0, INF, -INF, 100.0]:
        ref = reference_norm(member_values, norm_type)
        cases += [replace(c, group=members, members=members) for c in clip_cases(pieces, norm_type, "subgroup", ref)]
    run_and_check(worlds(world_size), cases)


def test_non_member_gets_value_error(worlds):
    """On a 3-rank world, group = new_group([0, 1]): ranks 0 and 1 clip over it, rank 2 passes the object
    new_group returned there and gets ValueError (no collective) for both clip_grad_norm_ and get_total_norm."""
    pieces = cut_round_robin(logical_vector(seed=13), 3, None)
    cases = [Case(pieces, 2.0, 1.0, api=api, group=(0, 1), label="non-member") for api in [clip, total]]
    for case, results in zip(cases, run_sharded(worlds(3), cases)):
        check_ok(replace(case, pieces=pieces[:2]), results[:2])
        check_rank_raised(case, results, 2, ValueError, comms=0, match="not a member")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_world_and_explicit_full_group_agree_bitwise(worlds, world_size):
    """group=dist.group.WORLD and group=dist.new_group(all ranks) give bitwise the same norm and grads."""
    pieces = cut_uneven(logical_vector(seed=17), world_size, random.Random(17))
    everyone = tuple(range(world_size))
    pairs = [(Case(pieces, p, 0.5, group=WORLD, label="WORLD"),
              Case(pieces, p, 0.5, group=everyone, label="new_group(all)")) for p in [2.0, 3.0, INF, -INF]]
    results = run_sharded(worlds(world_size), [c for pair in pairs for c in pair])
    for i, (world_case, full_case) in enumerate(pairs):
        a, b = results[2 * i], results[2 * i + 1]
        check_ok(world_case, a)
        check_ok(full_case, b)
        for r in range(world_size):
            assert_bitwise(a[r].norm, b[r].norm, f"p={world_case.norm_type} rank {r}")
            for ga, gb in zip(a[r].grads, b[r].grads):
                if ga is not None:
                    assert_bitwise(ga, gb, f"p={world_case.norm_type} rank {r} grads")
