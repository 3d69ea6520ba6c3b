"""Cuts of one logical gradient vector over the ranks (``group=``): whatever the cut (whole tensors, flat
FSDP/ZeRO chunks padded or short, uneven cuts across tensor boundaries, empty ranks) and whatever the dtypes,
the norm is the float64 norm of the whole vector, bitwise the same on every rank, and every rank scales its
own piece by the same coefficient. See ``_sharded_cases`` for how a case runs.
"""

import random

import pytest

from _sharded_cases import (
    CUTS,
    INF,
    NORM_TYPES,
    WORLD_SIZES,
    Case,
    check_ok,
    clip_cases,
    cut_flat_padded,
    cut_round_robin,
    cut_uneven_per_dtype,
    logical_vector,
    run_and_check,
    run_sharded,
    total,
)
from _tester import DTYPES, reference_norm


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cut_norm_matches_float64_reference(worlds, world_size, cut, norm_type):
    """Whatever the cut, the norm is the float64 norm of the whole vector, bitwise the same on every rank,
    and every rank scales its own piece by the same coefficient (bitwise unchanged when it is 1)."""
    values = logical_vector(seed=1)
    pieces = CUTS[cut](values, world_size, random.Random(world_size))
    ref = reference_norm([g for p in pieces for g in p], norm_type)
    run_and_check(worlds(world_size), clip_cases(pieces, norm_type, f"cut={cut}", ref))


def test_padding_zeros_count_for_minus_inf(worlds):
    """FSDP's zero padding is part of what a rank passes: the -inf norm of the padded cut is 0 (a sanity
    check on the reference used above, which takes the pieces as given)."""
    pieces = cut_flat_padded(logical_vector(seed=1), 2, None)
    assert pieces[-1][0][-1] == 0.0
    case = Case(pieces, -INF, api=total, label="padded")
    assert check_ok(case, run_sharded(worlds(2), [case])[0]).item() == 0.0


@pytest.mark.parametrize("cut", ["round_robin", "per_dtype_uneven"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mixed_dtypes_across_and_within_ranks(worlds, world_size, cut):
    """float32, float64, bfloat16 and float16 grads, whole tensors per rank (dtypes differ across ranks) or
    each dtype's buffer cut over all ranks (several dtypes on every rank): the float64 norm of the values."""
    values = logical_vector(seed=2, dtypes=DTYPES)
    rng = random.Random(world_size)
    pieces = cut_round_robin(values, world_size, rng) if cut == "round_robin" else cut_uneven_per_dtype(
        values, world_size, rng)
    cases = []
    for norm_type in [0.5, 1.0, 2.0, 3.0, INF, -INF, 8.0, 100.0]:
        ref = reference_norm(values, norm_type)
        cases += clip_cases(pieces, norm_type, f"mixed dtypes {cut}", ref)
    run_and_check(worlds(world_size), cases)
