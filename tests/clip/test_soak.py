"""Soak: ``DISTCLIP_SOAK_CALLS`` sharded clips (2000 by default) of random pieces on 4 ranks: every result
within 1e-5 of the float64 reference, and the resources (resident memory, live tensors, threads, process
groups) flat between a warm-up and the end.
"""

import gc
import math
import os
import random
import threading

import pytest
import torch
import torch.distributed as dist

import distclip
from _tester import DTYPES, grad_params, reference_norm

SOAK_CALLS = int(os.environ.get("DISTCLIP_SOAK_CALLS", "2000"))
SOAK_NORM_TYPES = [1.0, 2.0, 3.0, 0.5, 8.0, math.inf, -math.inf]


def _soak_case(rng: random.Random, world_size: int) -> tuple[list[list[torch.Tensor]], float, torch.dtype]:
    dtype = rng.choice(DTYPES)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    tensors = [torch.randn(rng.randint(1, 40), generator=gen) * 10 ** rng.uniform(-3, 3) for _ in range(rng.randint(1, 6))]
    flat = torch.cat(tensors).to(dtype)
    cuts = sorted(rng.randint(0, flat.numel()) for _ in range(world_size - 1))
    bounds = [0, *cuts, flat.numel()]
    pieces = [[flat[a:b]] if b > a else [] for a, b in zip(bounds, bounds[1:])]
    return pieces, rng.choice(SOAK_NORM_TYPES), dtype


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _soak_rank(seed: int, calls: int):
    """``calls`` clips of random pieces on every rank; returns the worst relative error and the resource
    readings (RSS, live tensors, threads, process groups) after a warm-up and at the end."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rng = random.Random(seed)  # the same draws on every rank, so every rank knows every piece
    worst = 0.0

    def readings():
        return _resident_bytes(), _live_tensors(), threading.active_count(), len(dist.distributed_c10d._world.pg_map)

    for i in range(calls):
        if i == calls // 4:
            start = readings()
        pieces, p, _ = _soak_case(rng, world_size)
        params = grad_params(pieces[rank])
        norm = distclip.clip_grad_norm_(params, 1.0, p, group=dist.group.WORLD).item()
        reference = reference_norm([x for piece in pieces for x in piece], p)
        error = abs(norm - reference) / reference if reference else abs(norm)
        worst = max(worst, error)
        del params
    return worst, start, readings()


@pytest.mark.slow
def test_soak_results_exact_and_resources_flat(worlds):
    outcomes = worlds(4).run(_soak_rank, 2026, SOAK_CALLS, timeout=600)
    for worst, (rss0, tensors0, threads0, groups0), (rss1, tensors1, threads1, groups1) in outcomes:
        assert worst <= 1e-5
        assert tensors1 == tensors0 and threads1 == threads0 and groups1 == groups0
        assert rss1 - rss0 < 16 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"
