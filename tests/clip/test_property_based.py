"""Property-based (hypothesis): on one process, ``clip_grad_norm_`` is torch's bitwise for any tensors, dtypes,
norm type and foreach; sharded over 3 ranks, ``get_total_norm`` of any cut of a vector is its float64 norm
within 1e-5.
"""

import math
import random

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import distclip
from _tester import DTYPES, Spec, compare, reference_norm

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
norm_types = st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.5, math.inf, -math.inf, 0.0, 1, 2, "inf"])


@settings(max_examples=150, deadline=None)
@given(
    tensors=st.lists(st.tuples(shapes, st.sampled_from(DTYPES), st.booleans(), st.floats(1e-6, 1e6)), max_size=5),
    norm_type=norm_types,
    foreach=st.sampled_from([None, True, False]),
    seed=st.integers(0, 2**16),
)
def test_property_single_process_is_torch_bitwise(tensors, norm_type, foreach, seed):
    compare(Spec(tensors, seed=seed), "clip_grad_norm_", max_norm=1.0, norm_type=norm_type, foreach=foreach)


def _property_rank(cases):
    rank = dist.get_rank()
    return [distclip.get_total_norm(pieces[rank], p, group=dist.group.WORLD).item() for pieces, p in cases]


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e18]),
    cut_seed=st.integers(0, 2**16),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.5, 100.0, math.inf, -math.inf]),
)
def test_property_sharded_equals_float64_reference(worlds, sizes, dtype, scale, cut_seed, norm_type):
    rng = random.Random(cut_seed)
    gen = torch.Generator().manual_seed(cut_seed)
    flat = torch.cat([torch.randn(n, generator=gen) for n in sizes]).mul(scale).to(dtype)
    cases = []
    for world_cut in range(3):  # three different cuts of the same vector over the 3 ranks
        cuts = sorted(rng.randint(0, flat.numel()) for _ in range(2))
        bounds = [0, *cuts, flat.numel()]
        cases.append(([[flat[a:b]] for a, b in zip(bounds, bounds[1:])], norm_type))
    reference = reference_norm([flat], norm_type)
    for per_rank in worlds(3).run(_property_rank, cases):
        for norm in per_rank:
            assert norm == pytest.approx(reference, rel=1e-5, abs=0, nan_ok=True), (norm, reference)
