"""Failure behaviour: mismatched calls, dead ranks, long runs, random inputs, compiled steps.

Mismatches and dead ranks run on real gloo groups with short timeouts, so a hang would fail in seconds. The
soak runs ``DISTCLIP_SOAK_CALLS`` clips (2000 by default) on 4 ranks.
"""

import gc
import math
import os
import random
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import distclip
from _world import answers
from _tester import DTYPES, Spec, compare, grad_params, reference_norm

SHORT_TIMEOUT = timedelta(seconds=3)


# ---- mismatched calls -------------------------------------------------------------------------------------


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


# ---- a rank that dies or never calls ----------------------------------------------------------------------


def _lonely_rank(rank: int, world_size: int, port: int, fate: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=SHORT_TIMEOUT
    )
    params = grad_params([torch.ones(4)])
    distclip.clip_grad_norm_(params, 1.0, group=dist.group.WORLD)  # a first call that every rank makes
    if rank == world_size - 1:
        if fate == "dies":
            os._exit(3)
        time.sleep(3 * SHORT_TIMEOUT.total_seconds())  # alive, but never makes the second call
        results.put((rank, None, 0.0))
        return
    start = time.monotonic()
    try:
        distclip.clip_grad_norm_(params, 1.0, group=dist.group.WORLD)
        results.put((rank, "returned", time.monotonic() - start))
    except Exception as err:  # the survivors' error is what the test checks
        results.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - start))


@pytest.mark.slow
@pytest.mark.parametrize("fate", ["dies", "never_calls"])
def test_survivors_get_a_clear_error_in_bounded_time(fate):
    world_size = 3
    survivors = answers(_lonely_rank, world_size, (fate,), set(range(world_size - 1)))
    for outcome, elapsed in survivors.values():
        assert outcome.startswith("RuntimeError: distclip: the clip's all_reduce over a group of 3 ranks"), outcome
        assert "did not make the same call within the group's timeout" in outcome
        assert elapsed < 30, f"the error took {elapsed:.1f} s"


# ---- soak --------------------------------------------------------------------------------------------------

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


# ---- property-based ----------------------------------------------------------------------------------------

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


# ---- torch.compile -----------------------------------------------------------------------------------------


def _training_step(clip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        norm = clip(model.parameters(), 0.5)
        optimizer.step()
        return norm

    return model, step


def test_compiled_step_matches_eager_with_torchs_graph_breaks():
    import torch._dynamo as dynamo

    breaks = {}
    for name, clip in [("torch", torch.nn.utils.clip_grad_norm_), ("distclip", distclip.clip_grad_norm_)]:
        dynamo.reset()
        _, step = _training_step(clip)
        breaks[name] = dynamo.explain(step)().graph_break_count
    assert breaks["distclip"] <= breaks["torch"], breaks

    eager_model, eager_step = _training_step(distclip.clip_grad_norm_)
    compiled_model, step = _training_step(distclip.clip_grad_norm_)
    dynamo.reset()
    compiled_step = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        assert torch.equal(compiled_step(), eager_step())
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
