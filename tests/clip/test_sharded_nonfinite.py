"""Non-finite gradients (``group=``): a NaN on one rank gives NaN on every rank (also for inf and -inf, where
a MAX/MIN reduction alone would drop it), an inf gives inf, and with ``error_if_nonfinite=True`` every rank
raises after the one collective with no gradient changed. See ``_sharded_cases``.
"""

import math
import random

import pytest

from _sharded_cases import (
    INF,
    NAN,
    WORLD_SIZES,
    Case,
    FreshGroup,
    check_ok,
    check_raises,
    clip,
    cut_round_robin,
    cut_uneven,
    logical_vector,
    run_sharded,
    total,
    with_value,
)


@pytest.mark.parametrize("bad_rank", ["first", "last"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_nan_on_one_rank_gives_nan_on_every_rank(worlds, world_size, bad_rank):
    """A NaN in one rank's grads gives NaN on every rank, also for inf/-inf (a MAX/MIN reduction alone would
    drop it) and for large p."""
    rank = 0 if bad_rank == "first" else world_size - 1
    pieces = with_value(cut_uneven(logical_vector(seed=6), world_size, random.Random(6)), rank, NAN)
    cases = [Case(pieces, p, 1.0, label=f"nan on rank {rank}") for p in [2.0, INF, -INF, 0.5, 1.0, 100.0]]
    cases += [Case(pieces, p, api=total, label=f"nan on rank {rank}") for p in [2.0, INF, -INF]]
    for case, results in zip(cases, run_sharded(worlds(world_size), cases)):
        assert math.isnan(check_ok(case, results).item())


@pytest.mark.parametrize("bad_rank", ["first", "last"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_inf_on_one_rank_gives_inf_on_every_rank(worlds, world_size, bad_rank):
    """An inf in one rank's grads gives inf on every rank for p = 1, 2, 100 and inf."""
    rank = 0 if bad_rank == "first" else world_size - 1
    pieces = with_value(cut_uneven(logical_vector(seed=7), world_size, random.Random(7)), rank, INF)
    cases = [Case(pieces, p, 1.0, label=f"inf on rank {rank}") for p in [1.0, 2.0, 100.0, INF]]
    cases += [Case(pieces, p, api=total, label=f"inf on rank {rank}") for p in [2.0, INF]]
    for case, results in zip(cases, run_sharded(worlds(world_size), cases)):
        assert check_ok(case, results).item() == INF


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_error_if_nonfinite_raises_on_every_rank_and_changes_nothing(worlds, world_size, value):
    """With error_if_nonfinite=True and a non-finite value on one rank, every rank raises RuntimeError after
    the one collective, no grad changes (bitwise), and the world is usable afterwards (the last case)."""
    rank = world_size // 2
    pieces = with_value(cut_round_robin(logical_vector(seed=8), world_size, None), rank, value)
    bad = [Case(pieces, p, 1.0, api=api, error_if_nonfinite=True, group=FreshGroup(tuple(range(world_size))),
                label=f"{value} on rank {rank}")
           for p in [2.0, INF, -INF, 100.0] for api in [clip, total]]
    bad = [c for c in bad if not (value == INF and float(c.norm_type) == -INF)]  # min|x| stays finite there
    good_pieces = cut_round_robin(logical_vector(seed=8), world_size, None)
    good = Case(good_pieces, 2.0, 1.0, error_if_nonfinite=True, label="finite, after the errors")
    results = run_sharded(worlds(world_size), bad + [good], isolated=True)
    for case, res in zip(bad, results):
        check_raises(case, res, RuntimeError, comms=1, match="non-finite")
    check_ok(good, results[-1])
