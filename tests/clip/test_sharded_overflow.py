"""Overflow and underflow (``group=``): float32 gradients whose p-th powers overflow (around 1e18..1e20) or
underflow (1e-30, subnormals), and float16 gradients whose norm passes 65504, give a finite, accurate norm
against the float64 reference, and the gradients are scaled by it. See ``_sharded_cases``.
"""

import math
import random

import pytest
import torch

from _sharded_cases import (
    INF,
    WORLD_SIZES,
    clip_cases,
    cut_uneven,
    cut_uneven_per_dtype,
    flat,
    logical_vector,
    run_and_check,
)
from _tester import reference_norm


@pytest.mark.parametrize("norm_type", [2.0, 3.0, 8.0, 100.0, INF], ids=repr)
@pytest.mark.parametrize("scale", [1e18, 1e20], ids=["1e18", "1e20"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_huge_float32_grads_give_finite_accurate_norm(worlds, world_size, scale, norm_type):
    """float32 grads around 1e18..1e20, whose float32 p-th powers overflow: the norm is finite and accurate,
    and the grads are scaled by the tiny coefficient."""
    values = logical_vector(seed=3, scale=scale)
    assert torch.isinf(torch.linalg.vector_norm(flat(values), 3.0)), "the float32 kernel should overflow here"
    pieces = cut_uneven(values, world_size, random.Random(3))
    ref = reference_norm(values, norm_type)
    assert math.isfinite(ref) and ref < torch.finfo(torch.float32).max
    run_and_check(worlds(world_size), clip_cases(pieces, norm_type, f"scale={scale:g}", ref))


@pytest.mark.parametrize("scale", [1e-30, 1e-40], ids=["1e-30", "1e-40_subnormal"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_tiny_float32_grads_do_not_underflow(worlds, world_size, scale):
    """float32 grads around 1e-30 (squares underflow in float32) and subnormal ones: the norm is accurate,
    not 0, for p = 2, 3, 100, inf and -inf."""
    values = logical_vector(seed=4, scale=scale)
    pieces = cut_uneven(values, world_size, random.Random(4))
    cases = []
    for norm_type in [2.0, 3.0, 100.0, INF, -INF]:
        ref = reference_norm(values, norm_type)
        assert ref > 0.0
        cases += clip_cases(pieces, norm_type, f"scale={scale:g}", ref)
    run_and_check(worlds(world_size), cases)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_float16_grads_with_norm_above_float16_max(worlds, world_size):
    """float16 grads of 2e4..6e4: the norm (over 65504, the float16 maximum) is returned finite and accurate
    in float64, and the float16 grads are scaled down."""
    gen = torch.Generator().manual_seed(5)
    values = [(2e4 + 4e4 * torch.rand(shape, generator=gen)).to(torch.float16) for shape in [(4,), (3, 3), (5,)]]
    pieces = cut_uneven_per_dtype(values, world_size, random.Random(5))
    cases = []
    for norm_type in [1.0, 2.0, 3.0, 8.0]:
        ref = reference_norm(values, norm_type)
        assert ref > 65504.0
        cases += clip_cases(pieces, norm_type, "fp16 > 65504", ref)
    run_and_check(worlds(world_size), cases)
