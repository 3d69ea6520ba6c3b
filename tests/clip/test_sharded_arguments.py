"""Arguments of the sharded calls (``group=``): a bad ``norm_type`` or ``max_norm`` raises on every rank
(also a rank without gradients) before any communication and changes no gradient; the edge values that are
valid (max_norm 0, an int, inf) clip as they should; ``clip_grad_value_`` takes no group; the deprecated
``clip_grad_norm`` and a single tensor as parameters work in sharded mode. See ``_sharded_cases``.
"""

import inspect
import random

import pytest
import torch

import distclip
from _sharded_cases import (
    INF,
    NAN,
    WORLD_SIZES,
    Case,
    FreshGroup,
    alias,
    check_ok,
    check_raises,
    clip,
    cut_empty_list_on_rank0,
    cut_no_grads_on_last_rank,
    cut_uneven,
    logical_vector,
    run_sharded,
    total,
)
from _tester import reference_norm


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_invalid_norm_type_or_max_norm_raises_on_every_rank_without_communication(worlds, world_size):
    """norm_type 0, negative finite or NaN, and max_norm NaN or negative: ValueError on every rank (also the
    rank with no grads), no collective, no grad changed, no hang (a fresh group with a short timeout)."""
    pieces = cut_empty_list_on_rank0(logical_vector(seed=9), world_size, None)
    group = FreshGroup(tuple(range(world_size)))
    cases = [Case(pieces, p, 1.0, api=api, group=group, label="bad norm_type")
             for p in [0, 0.0, -1, -1.0, -2.5, NAN, "nan", "-2"] for api in [clip, total]]
    cases += [Case(pieces, 2.0, m, group=group, label="bad max_norm") for m in [NAN, -1, -1.0, -1e-9, -INF]]
    for case, results in zip(cases, run_sharded(worlds(world_size), cases, isolated=True)):
        check_raises(case, results, ValueError, comms=0)


@pytest.mark.parametrize("world_size", [3])
def test_non_numeric_arguments_raise_a_clear_error_on_every_rank(worlds, world_size):
    """max_norm None or 'abc', norm_type 'abc' or None: TypeError/ValueError naming the argument, on every
    rank, without communication."""
    pieces = cut_no_grads_on_last_rank(logical_vector(seed=10), world_size, None)
    group = FreshGroup(tuple(range(world_size)))
    cases = [(Case(pieces, 2.0, m, group=group, label="max_norm"), "max_norm") for m in [None, "abc", [1.0]]]
    cases += [(Case(pieces, p, 1.0, api=api, group=group, label="norm_type"), "norm_type")
              for p in ["abc", None] for api in [clip, total]]
    results = run_sharded(worlds(world_size), [c for c, _ in cases], isolated=True)
    for (case, name), res in zip(cases, results):
        check_raises(case, res, (TypeError, ValueError), comms=0, match=name)


def test_valid_edge_max_norms(worlds):
    """max_norm 0 zeroes every grad, an int max_norm works, max_norm inf leaves the grads bitwise alone."""
    values = logical_vector(seed=11)
    pieces = cut_uneven(values, 3, random.Random(11))
    cases = [Case(pieces, p, m, label="edge max_norm") for p in [2.0, INF] for m in [0.0, 0, 1, INF]]
    for case, results in zip(cases, run_sharded(worlds(3), cases)):
        check_ok(case, results)
        if case.max_norm == 0:
            assert all(not g.any() for res in results for g in res.grads if g is not None)


def test_clip_grad_value_has_no_group_argument():
    """clip_grad_value_ is elementwise: it takes no group= (no collective is ever needed)."""
    assert "group" not in inspect.signature(distclip.clip_grad_value_).parameters
    with pytest.raises(TypeError):
        distclip.clip_grad_value_([torch.zeros(2, requires_grad=True)], 1.0, group=None)


def test_deprecated_alias_and_single_tensor_parameters(worlds):
    """clip_grad_norm (deprecated) with group= warns FutureWarning and clips like clip_grad_norm_; a single
    Tensor as parameters works in sharded mode."""
    values = logical_vector(seed=18, shapes=[(5,), (3, 2), (4,)])
    pieces = [[v] for v in values]
    ref = reference_norm(values, 2.0)
    deprecated = Case(pieces, 2.0, 0.37 * ref, api=alias, label="alias")
    single = Case(pieces, 2.0, 0.37 * ref, container="tensor", label="single tensor")
    alias_results, single_results = run_sharded(worlds(3), [deprecated, single])
    check_ok(deprecated, alias_results)
    check_ok(single, single_results)
    for res in alias_results:
        assert [c for c, _ in res.warnings] == [FutureWarning], res.warnings
    for res in single_results:
        assert res.warnings == [], res.warnings
