"""A seeded random sweep of the sharded calls (``group=``): random tensors (0-d included), dtypes, scales
per tensor, cuts, norm types, foreach, call and parameter container; every case against the float64
reference within 1e-5, bitwise equal on every rank, gradients scaled by the reference coefficient. See
``_sharded_cases``.
"""

import random

import pytest
import torch

from _sharded_cases import (
    CUTS,
    INF,
    Case,
    check_ok,
    clip,
    cut_uneven_per_dtype,
    run_sharded,
    total,
    total_then_scale,
)
from _tester import DTYPES, reference_norm

SWEEP_NORM_TYPES = [0.5, 1, 1.0, 1.5, 2, 2.0, 2.5, 3.0, 4.0, 6.4, 7.0, 8.0, 17.3, 100.0, 1e4, INF, -INF, "inf",
                    "-inf", "2"]
# log10 of the value scale per dtype: within the range where the whole vector's norm is finite in float32
# (float16 kept within its own range).
SWEEP_SCALES = {torch.float32: (-30, 18), torch.float64: (-30, 18), torch.bfloat16: (-30, 18),
                torch.float16: (-3, 3)}


def sweep_case(rng, world_size, index):
    """A random case: 1-6 tensors of random shapes (0-d included) and dtypes, a random scale per tensor,
    a random cut, norm type, foreach, API and parameter container."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    values = []
    for _ in range(rng.randint(1, 6)):
        dtype = rng.choice(DTYPES if rng.random() < 0.5 else [torch.float32])
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 3)))
        scale = 10.0 ** rng.uniform(*SWEEP_SCALES[dtype])
        values.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype))
    cut = rng.choice(["round_robin", "per_dtype_uneven", "empty_list_rank0", "no_grads_last_rank"])
    cutter = cut_uneven_per_dtype if cut == "per_dtype_uneven" else CUTS[cut]
    pieces = cutter(values, world_size, rng)
    norm_type = rng.choice(SWEEP_NORM_TYPES)
    ref = reference_norm(values, norm_type)
    api = rng.choice([clip, clip, total, total_then_scale])
    max_norm = rng.choice([0.37 * ref, 2.0 * ref + 1.0, INF, 1.0])
    container = rng.choice(["list", "generator"])
    case = Case(pieces, norm_type, max_norm, api=api, foreach=rng.choice([None, True, False]),
                container=container, label=f"sweep #{index} cut={cut} container={container}")
    return case, ref


@pytest.mark.parametrize("world_size,batch", [(3, 0), (3, 1), (4, 0), (4, 1)])
def test_random_sweep(worlds, world_size, batch):
    """20 random cases per batch, 80 in all: the float64 reference within 1e-5, bitwise equal on every
    rank, grads scaled by the reference coefficient."""
    rng = random.Random(1000 * world_size + batch)
    drawn = [sweep_case(rng, world_size, i) for i in range(20)]
    results = run_sharded(worlds(world_size), [case for case, _ in drawn])
    for (case, ref), res in zip(drawn, results):
        check_ok(case, res, ref=ref)
