"""Sharded mode (``group=``): every rank holds a disjoint piece of one logical gradient vector.

The tests build the logical vector and its pieces here, in the test process, send every rank the list of all
ranks' pieces, and let each rank clip its own piece on a real gloo world (``worlds`` fixture). What comes back
(the returned norm, the gradients afterwards, the collectives counted, any exception) is checked against a
float64 reference of the concatenated pieces. Many cases go to the world in one ``world.run`` call to keep
the overhead low; every case carries a label that the assertion messages name.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked: the
collectives are counted with ``CommDebugMode`` on real gloo.
"""

import inspect
import math
import random
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from _tester import (
    DTYPES,
    assert_bitwise,
    assert_grads_scaled,
    assert_grads_unchanged,
    assert_norm_close,
    clip_coefficient,
    grad_params,
    reference_norm,
)

INF = math.inf
NAN = math.nan
WORLD_SIZES = [2, 3, 4]
# The shapes of the logical vector: 67 elements, so that no FSDP-style equal cut on 2, 3 or 4 ranks is exact.
SHAPES = [(3, 4), (7,), (2, 3, 2), (5,), (1,), (4, 4), (6, 1), (8,)]
# The norm types of the reference comparisons: floats, an int, strings, and large p (several wire scales).
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, 2.5, INF, -INF, 2, "inf", "-inf", 8.0, 100.0]
# A group made fresh for one case, with a short collective timeout: a rank left waiting in the collective
# (a library bug) comes back with an error after this long instead of hanging the world.
SHORT_TIMEOUT_S = 3


# --------------------------------------------------------------------------------------------------------
# Rank side: runs inside the gloo workers.
# --------------------------------------------------------------------------------------------------------

_CACHED_GROUPS: dict = {}


def _rank_group(spec):
    """The process group a case names: None, "WORLD", a tuple of ranks (made once per world and cached), or
    ("fresh", ranks) for a new group with a short timeout. Every rank calls this, members or not, in the same
    order, as ``dist.new_group`` requires."""
    if spec is None:
        return None
    if spec == "WORLD":
        return dist.group.WORLD
    if spec[0] == "fresh":
        return dist.new_group(list(spec[1]), timeout=timedelta(seconds=SHORT_TIMEOUT_S))
    if spec not in _CACHED_GROUPS:
        _CACHED_GROUPS[spec] = dist.new_group(list(spec))
    return _CACHED_GROUPS[spec]


def _rank_parameters_arg(params, container):
    if container == "generator":
        return (p for p in params)
    if container == "tensor":
        (param,) = params
        return param
    return params


def _rank_call(case, params, group, extra):
    api = case["api"]
    kwargs = dict(
        norm_type=case["norm_type"], error_if_nonfinite=case["error_if_nonfinite"], foreach=case["foreach"]
    )
    grads = [p.grad for p in params if p.grad is not None]
    if api == "clip":
        return distclip.clip_grad_norm_(
            _rank_parameters_arg(params, case["container"]), case["max_norm"], **kwargs, group=group
        )
    if api == "alias":
        return distclip.clip_grad_norm(params, case["max_norm"], **kwargs, group=group)
    if api == "total":
        return distclip.get_total_norm(grads, **kwargs, group=group)
    if api == "total_then_scale":
        total = distclip.get_total_norm(grads, **kwargs, group=group)
        with CommDebugMode() as scale_mode:
            distclip.clip_grads_with_norm_(params, case["max_norm"], total, foreach=case["foreach"])
        extra["scale_comms"] = scale_mode.get_total_counts()
        return total
    raise AssertionError(f"unknown api {api!r}")


def _rank_run_case(rank, case):
    group = _rank_group(case["group"])
    params = grad_params(case["pieces"][rank])
    out = {"norm": None, "error": None, "comms": None, "warnings": [], "extra": {}}
    if case["members"] is None or rank in case["members"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mode = CommDebugMode()
            try:
                with mode:
                    out["norm"] = _rank_call(case, params, group, out["extra"])
            except Exception as err:  # compared with the expected outcome by the test
                out["error"] = (type(err), str(err))
            out["comms"] = mode.get_total_counts()
        out["warnings"] = [(w.category, str(w.message)) for w in caught]
    out["grads"] = [p.grad for p in params]
    return out


def _rank_run_cases(cases):
    rank = dist.get_rank()
    return [_rank_run_case(rank, case) for case in cases]


# --------------------------------------------------------------------------------------------------------
# Test side: logical vectors, cuts, reference and checks.
# --------------------------------------------------------------------------------------------------------


def make_case(pieces, norm_type=2.0, max_norm=None, *, api="clip", group="WORLD", members=None, foreach=None,
              error_if_nonfinite=False, container="list", label=""):
    """One call on every rank (or on ``members`` only): ``pieces[r]`` is rank r's list of grads."""
    return dict(pieces=pieces, norm_type=norm_type, max_norm=max_norm, api=api, group=group, members=members,
                foreach=foreach, error_if_nonfinite=error_if_nonfinite, container=container,
                label=f"{label} api={api} p={norm_type!r} max_norm={max_norm!r} foreach={foreach} group={group}")


def run_cases(world, cases, isolated=False):
    """Run ``cases``; ``result[i][r]`` is rank r's outcome of case i. All in one round trip, or with
    ``isolated`` one round trip per case: where a case may leave a rank behind in a collective (the tests of
    errors, which use a fresh group with a short timeout), the next case then still starts on every rank
    together and the failure is reported against the case that caused it."""
    batches = [[case] for case in cases] if isolated else [cases]
    results = []
    for batch in batches:
        per_rank = world.run(_rank_run_cases, batch)
        results += [[per_rank[r][i] for r in range(world.world_size)] for i in range(len(batch))]
    return results


def logical_vector(seed, shapes=SHAPES, dtypes=(torch.float32,), scale=1.0):
    """Seeded tensors of ``shapes``, dtypes cycling through ``dtypes``, values ``randn * scale``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)])
        for i, shape in enumerate(shapes)
    ]


def _flat(values):
    return torch.cat([v.reshape(-1) for v in values])


def cut_round_robin(values, n, rng):
    """Whole tensors per rank, tensor i on rank i % n; every rank also has a parameter without grad."""
    pieces = [[None] for _ in range(n)]
    for i, v in enumerate(values):
        pieces[i % n].insert(-1 if i % 2 else 0, v)
    return pieces


def _flat_chunks(values, n, pad):
    flat = _flat(values)
    chunk = -(-flat.numel() // n)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(chunk * n - flat.numel())])
    return [[flat[r * chunk:(r + 1) * chunk]] for r in range(n)]


def cut_flat_padded(values, n, rng):
    """FSDP/ZeRO: flatten and concatenate everything, equal contiguous chunks, the last padded with zeros."""
    return _flat_chunks(values, n, pad=True)


def cut_flat_short(values, n, rng):
    """FSDP/ZeRO without padding: equal contiguous chunks, the last one shorter."""
    return _flat_chunks(values, n, pad=False)


def _uneven_ranges(numel, n, rng):
    cuts = sorted(rng.sample(range(1, numel), n - 1))
    return list(zip([0] + cuts, cuts + [numel]))


def cut_uneven(values, n, rng):
    """Contiguous pieces of the flat vector cut at random points (spanning tensor boundaries); a rank's piece
    is sometimes split again into two tensors, the second reshaped to 2-D where it can be."""
    flat = _flat(values)
    pieces = []
    for lo, hi in _uneven_ranges(flat.numel(), n, rng):
        piece = flat[lo:hi]
        if hi - lo >= 4 and rng.random() < 0.5:
            mid = rng.randrange(1, hi - lo)
            tail = piece[mid:]
            pieces.append([piece[:mid], tail.reshape(2, -1) if tail.numel() % 2 == 0 else tail])
        else:
            pieces.append([piece])
    return pieces


def cut_uneven_per_dtype(values, n, rng):
    """Mixed dtypes: each dtype's tensors flattened into one buffer, each buffer cut unevenly over the ranks,
    so every rank holds pieces of several dtypes."""
    pieces = [[] for _ in range(n)]
    for dtype in dict.fromkeys(v.dtype for v in values):
        flat = _flat([v for v in values if v.dtype == dtype])
        if flat.numel() < n:
            pieces[rng.randrange(n)].append(flat)
            continue
        for r, (lo, hi) in enumerate(_uneven_ranges(flat.numel(), n, rng)):
            pieces[r].append(flat[lo:hi])
    return pieces


def cut_empty_list_on_rank0(values, n, rng):
    """Rank 0 passes an empty parameter list; the others hold the whole tensors round-robin."""
    return [[]] + [[v for i, v in enumerate(values) if i % (n - 1) == r] for r in range(n - 1)]


def cut_no_grads_on_last_rank(values, n, rng):
    """The last rank's parameters all have ``grad=None``; the others hold the whole tensors round-robin."""
    return [[v for i, v in enumerate(values) if i % (n - 1) == r] for r in range(n - 1)] + [[None, None]]


CUTS = {
    "round_robin": cut_round_robin,
    "flat_padded": cut_flat_padded,
    "flat_short": cut_flat_short,
    "uneven": cut_uneven,
    "empty_list_rank0": cut_empty_list_on_rank0,
    "no_grads_last_rank": cut_no_grads_on_last_rank,
}


def _member_ranks(case, world_size):
    return list(range(world_size)) if case["members"] is None else list(case["members"])


def group_ranks(spec, world_size):
    """The ranks of the group a case names (see :func:`_rank_group`)."""
    if spec in (None, "WORLD"):
        return range(world_size)
    return spec[1] if spec[0] == "fresh" else spec


def case_reference(case, world_size):
    """The reference norm of ``case``: over the pieces of the group's ranks."""
    ranks = group_ranks(case["group"], world_size)
    return reference_norm([g for r in ranks for g in case["pieces"][r]], case["norm_type"])


def check_ok(case, results, ref=None):
    """Every calling rank returned the same float64 0-d CPU norm (bitwise), close to the float64 reference,
    from exactly one collective; it scaled its grads by the reference coefficient (``clip``) or left them
    alone (``total``); the ranks that did not call have their grads untouched. Returns the norm."""
    world_size = len(results)
    label = case["label"]
    members = _member_ranks(case, world_size)
    ref = case_reference(case, world_size) if ref is None else ref
    errors = [f"rank {r}: {results[r]['error'][0].__name__}: {results[r]['error'][1]}"
              for r in members if results[r]["error"] is not None]
    assert not errors, f"{label}: " + "; ".join(errors)
    norms = [results[r]["norm"] for r in members]
    first = norms[0]
    assert isinstance(first, torch.Tensor) and first.dtype == torch.float64 and first.dim() == 0, (
        f"{label}: returned {first!r}, expected a float64 0-d tensor")
    assert first.device.type == "cpu", f"{label}: norm on {first.device}"
    for r, norm in zip(members, norms):
        assert_bitwise(norm, first, f"{label}: norm on rank {r} vs rank {members[0]}")
        assert results[r]["comms"] == 1, f"{label}: rank {r} made {results[r]['comms']} collectives, expected 1"
    assert_norm_close(first.item(), ref, label)
    for r in range(world_size):
        before, after = case["pieces"][r], results[r]["grads"]
        if r in members and case["api"] in ("clip", "alias", "total_then_scale"):
            assert_grads_scaled(before, after, clip_coefficient(case["max_norm"], ref), f"{label} rank {r}")
        else:
            assert_grads_unchanged(before, after, f"{label} rank {r}")
    return first


def check_rank_raised(case, results, r, exc_types, comms, match=None):
    """Rank r raised one of ``exc_types`` (with ``match`` in the message) after ``comms`` collectives, and
    its grads are bitwise unchanged."""
    label = case["label"]
    error = results[r]["error"]
    assert error is not None, f"{label}: rank {r} did not raise, returned {results[r]['norm']!r}"
    assert issubclass(error[0], exc_types), f"{label}: rank {r} raised {error[0].__name__}: {error[1]}"
    if match is not None:
        assert match in error[1], f"{label}: rank {r}: {match!r} not in message {error[1]!r}"
    assert results[r]["comms"] == comms, f"{label}: rank {r} made {results[r]['comms']} collectives"
    assert_grads_unchanged(case["pieces"][r], results[r]["grads"], f"{label} rank {r}")


def check_raises(case, results, exc_types, comms, match=None):
    """Every rank raised (see :func:`check_rank_raised`)."""
    for r in range(len(results)):
        check_rank_raised(case, results, r, exc_types, comms, match)


def clip_cases(pieces, norm_type, label, ref):
    """The standard trio on one layout: a clip that scales (coef about 0.37, foreach=None), a clip with a
    max_norm so large that coef is 1 (foreach=False), and get_total_norm of the grads (foreach=True)."""
    return [
        make_case(pieces, norm_type, 0.37 * ref, label=label),
        make_case(pieces, norm_type, INF, foreach=False, label=label),
        make_case(pieces, norm_type, api="total", foreach=True, label=label),
    ]


def run_and_check(world, cases):
    for case, results in zip(cases, run_cases(world, cases)):
        check_ok(case, results)


def with_value(pieces, rank, value):
    """A copy of ``pieces`` where the first element of ``rank``'s first grad is ``value``."""
    pieces = [list(p) for p in pieces]
    grad = pieces[rank][0].clone()
    grad.view(-1)[0] = value
    pieces[rank][0] = grad
    return pieces


# --------------------------------------------------------------------------------------------------------
# 1. Cuts of one logical vector, every norm type.
# --------------------------------------------------------------------------------------------------------


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
    case = make_case(pieces, -INF, api="total", label="padded")
    assert check_ok(case, run_cases(worlds(2), [case])[0]).item() == 0.0


# --------------------------------------------------------------------------------------------------------
# 2. Mixed dtypes.
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# 3. Overflow and underflow safety.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 3.0, 8.0, 100.0, INF], ids=repr)
@pytest.mark.parametrize("scale", [1e18, 1e20], ids=["1e18", "1e20"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_huge_float32_grads_give_finite_accurate_norm(worlds, world_size, scale, norm_type):
    """float32 grads around 1e18..1e20, whose float32 p-th powers overflow: the norm is finite and accurate,
    and the grads are scaled by the tiny coefficient."""
    values = logical_vector(seed=3, scale=scale)
    assert torch.isinf(torch.linalg.vector_norm(_flat(values), 3.0)), "the float32 kernel should overflow here"
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


# --------------------------------------------------------------------------------------------------------
# 4-5. Non-finite gradients.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_rank", ["first", "last"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_nan_on_one_rank_gives_nan_on_every_rank(worlds, world_size, bad_rank):
    """A NaN in one rank's grads gives NaN on every rank, also for inf/-inf (a MAX/MIN reduction alone would
    drop it) and for large p."""
    rank = 0 if bad_rank == "first" else world_size - 1
    pieces = with_value(cut_uneven(logical_vector(seed=6), world_size, random.Random(6)), rank, NAN)
    cases = [make_case(pieces, p, 1.0, label=f"nan on rank {rank}") for p in [2.0, INF, -INF, 0.5, 1.0, 100.0]]
    cases += [make_case(pieces, p, api="total", label=f"nan on rank {rank}") for p in [2.0, INF, -INF]]
    for case, results in zip(cases, run_cases(worlds(world_size), cases)):
        assert math.isnan(check_ok(case, results).item())


@pytest.mark.parametrize("bad_rank", ["first", "last"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_inf_on_one_rank_gives_inf_on_every_rank(worlds, world_size, bad_rank):
    """An inf in one rank's grads gives inf on every rank for p = 1, 2, 100 and inf."""
    rank = 0 if bad_rank == "first" else world_size - 1
    pieces = with_value(cut_uneven(logical_vector(seed=7), world_size, random.Random(7)), rank, INF)
    cases = [make_case(pieces, p, 1.0, label=f"inf on rank {rank}") for p in [1.0, 2.0, 100.0, INF]]
    cases += [make_case(pieces, p, api="total", label=f"inf on rank {rank}") for p in [2.0, INF]]
    for case, results in zip(cases, run_cases(worlds(world_size), cases)):
        assert check_ok(case, results).item() == INF


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_error_if_nonfinite_raises_on_every_rank_and_changes_nothing(worlds, world_size, value):
    """With error_if_nonfinite=True and a non-finite value on one rank, every rank raises RuntimeError after
    the one collective, no grad changes (bitwise), and the world is usable afterwards (the last case)."""
    rank = world_size // 2
    pieces = with_value(cut_round_robin(logical_vector(seed=8), world_size, None), rank, value)
    bad = [make_case(pieces, p, 1.0, api=api, error_if_nonfinite=True, group=("fresh", tuple(range(world_size))),
                     label=f"{value} on rank {rank}")
           for p in [2.0, INF, -INF, 100.0] for api in ["clip", "total"]]
    bad = [c for c in bad if not (value == INF and float(c["norm_type"]) == -INF)]  # min|x| stays finite there
    good_pieces = cut_round_robin(logical_vector(seed=8), world_size, None)
    good = make_case(good_pieces, 2.0, 1.0, error_if_nonfinite=True, label="finite, after the errors")
    results = run_cases(worlds(world_size), bad + [good], isolated=True)
    for case, res in zip(bad, results):
        check_raises(case, res, RuntimeError, comms=1, match="non-finite")
    check_ok(good, results[-1])


# --------------------------------------------------------------------------------------------------------
# 6. Invalid arguments: raise on every rank, before any communication.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_invalid_norm_type_or_max_norm_raises_on_every_rank_without_communication(worlds, world_size):
    """norm_type 0, negative finite or NaN, and max_norm NaN or negative: ValueError on every rank (also the
    rank with no grads), no collective, no grad changed, no hang (a fresh group with a short timeout)."""
    pieces = cut_empty_list_on_rank0(logical_vector(seed=9), world_size, None)
    group = ("fresh", tuple(range(world_size)))
    cases = [make_case(pieces, p, 1.0, api=api, group=group, label="bad norm_type")
             for p in [0, 0.0, -1, -1.0, -2.5, NAN, "nan", "-2"] for api in ["clip", "total"]]
    cases += [make_case(pieces, 2.0, m, group=group, label="bad max_norm") for m in [NAN, -1, -1.0, -1e-9, -INF]]
    for case, results in zip(cases, run_cases(worlds(world_size), cases, isolated=True)):
        check_raises(case, results, ValueError, comms=0)


@pytest.mark.parametrize("world_size", [3])
def test_non_numeric_arguments_raise_a_clear_error_on_every_rank(worlds, world_size):
    """max_norm None or 'abc', norm_type 'abc' or None: TypeError/ValueError naming the argument, on every
    rank, without communication."""
    pieces = cut_no_grads_on_last_rank(logical_vector(seed=10), world_size, None)
    group = ("fresh", tuple(range(world_size)))
    cases = [(make_case(pieces, 2.0, m, group=group, label="max_norm"), "max_norm") for m in [None, "abc", [1.0]]]
    cases += [(make_case(pieces, p, 1.0, api=api, group=group, label="norm_type"), "norm_type")
              for p in ["abc", None] for api in ["clip", "total"]]
    results = run_cases(worlds(world_size), [c for c, _ in cases], isolated=True)
    for (case, name), res in zip(cases, results):
        check_raises(case, res, (TypeError, ValueError), comms=0, match=name)


def test_valid_edge_max_norms(worlds):
    """max_norm 0 zeroes every grad, an int max_norm works, max_norm inf leaves the grads bitwise alone."""
    values = logical_vector(seed=11)
    pieces = cut_uneven(values, 3, random.Random(11))
    cases = [make_case(pieces, p, m, label="edge max_norm") for p in [2.0, INF] for m in [0.0, 0, 1, INF]]
    for case, results in zip(cases, run_cases(worlds(3), cases)):
        check_ok(case, results)
        if case["max_norm"] == 0:
            assert all(not g.any() for res in results for g in res["grads"] if g is not None)


def test_clip_grad_value_has_no_group_argument():
    """clip_grad_value_ is elementwise: it takes no group= (no collective is ever needed)."""
    assert "group" not in inspect.signature(distclip.clip_grad_value_).parameters
    with pytest.raises(TypeError):
        distclip.clip_grad_value_([torch.zeros(2, requires_grad=True)], 1.0, group=None)


# --------------------------------------------------------------------------------------------------------
# 7. Sub-groups.
# --------------------------------------------------------------------------------------------------------


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
        cases += [dict(c, group=members, members=members) for c in clip_cases(pieces, norm_type, "subgroup", ref)]
    run_and_check(worlds(world_size), cases)


def test_non_member_gets_value_error(worlds):
    """On a 3-rank world, group = new_group([0, 1]): ranks 0 and 1 clip over it, rank 2 passes the object
    new_group returned there and gets ValueError (no collective) for both clip_grad_norm_ and get_total_norm."""
    pieces = cut_round_robin(logical_vector(seed=13), 3, None)
    cases = [make_case(pieces, 2.0, 1.0, api=api, group=(0, 1), label="non-member") for api in ["clip", "total"]]
    for case, results in zip(cases, run_cases(worlds(3), cases)):
        check_ok(dict(case, pieces=pieces[:2]), results[:2])
        check_rank_raised(case, results, 2, ValueError, comms=0, match="not a member")


# --------------------------------------------------------------------------------------------------------
# 8. Collective count.
# --------------------------------------------------------------------------------------------------------


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
        cases += [make_case(pieces, p, 0.37 * ref, api=api, label="count")
                  for api in ["clip", "total", "total_then_scale"]]
    results = run_cases(worlds(world_size), cases)
    for i in range(0, len(cases), 3):
        clip, _, two_step = results[i:i + 3]
        for case, res in zip(cases[i:i + 3], results[i:i + 3]):
            check_ok(case, res)
        for r in range(world_size):
            assert two_step[r]["extra"]["scale_comms"] == 0
            assert_grads_unchanged(clip[r]["grads"], two_step[r]["grads"], f"{cases[i]['label']} rank {r}")


def test_no_collective_without_group(worlds):
    """group=None is a local clip on every rank: no collective, each rank its own norm (torch's dtype)."""
    pieces = cut_round_robin(logical_vector(seed=15), 2, None)
    cases = [make_case(pieces, p, 0.5, api=api, group=None, label="local")
             for p in [2.0, INF] for api in ["clip", "total", "total_then_scale"]]
    for case, results in zip(cases, run_cases(worlds(2), cases)):
        for r, res in enumerate(results):
            assert res["error"] is None and res["comms"] == 0, (case["label"], res["error"], res["comms"])
            expected = torch.nn.utils.get_total_norm([g for g in pieces[r] if g is not None], case["norm_type"])
            assert_bitwise(res["norm"], expected, f"{case['label']} rank {r}")


# --------------------------------------------------------------------------------------------------------
# 9. Ranks without grads.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_no_grads_anywhere_gives_zero_on_every_rank(worlds, world_size):
    """No rank has grads (empty lists and grad=None params): 0.0 (float64) on every rank, one collective."""
    pieces = [[] if r % 2 else [None] for r in range(world_size)]
    cases = [make_case(pieces, p, 1.0, api=api, label="no grads")
             for p in [2.0, INF, -INF, 0.5, 100.0] for api in ["clip", "total"]]
    for case, results in zip(cases, run_cases(worlds(world_size), cases)):
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
    case = make_case(pieces, norm_type, 1.0, group=("fresh", (0, 1, 2)), label="zero-element grad on rank 1")
    check_ok(case, run_cases(worlds(3), [case], isolated=True)[0], ref=reference_norm(values, norm_type))


# --------------------------------------------------------------------------------------------------------
# 10. Seeded random sweep.
# --------------------------------------------------------------------------------------------------------

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
    api = rng.choice(["clip", "clip", "total", "total_then_scale"])
    max_norm = rng.choice([0.37 * ref, 2.0 * ref + 1.0, INF, 1.0])
    container = rng.choice(["list", "generator"])
    case = make_case(pieces, norm_type, max_norm, api=api, foreach=rng.choice([None, True, False]),
                     container=container, label=f"sweep #{index} cut={cut} container={container}")
    return case, ref


@pytest.mark.parametrize("world_size,batch", [(3, 0), (3, 1), (4, 0), (4, 1)])
def test_random_sweep(worlds, world_size, batch):
    """20 random cases per batch, 80 in all: the float64 reference within 1e-5, bitwise equal on every
    rank, grads scaled by the reference coefficient."""
    rng = random.Random(1000 * world_size + batch)
    drawn = [sweep_case(rng, world_size, i) for i in range(20)]
    results = run_cases(worlds(world_size), [case for case, _ in drawn])
    for (case, ref), res in zip(drawn, results):
        check_ok(case, res, ref=ref)


# --------------------------------------------------------------------------------------------------------
# 11. group=WORLD vs an explicit group of every rank; the deprecated alias; single-tensor parameters.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_world_and_explicit_full_group_agree_bitwise(worlds, world_size):
    """group=dist.group.WORLD and group=dist.new_group(all ranks) give bitwise the same norm and grads."""
    pieces = cut_uneven(logical_vector(seed=17), world_size, random.Random(17))
    everyone = tuple(range(world_size))
    pairs = [(make_case(pieces, p, 0.5, group="WORLD", label="WORLD"),
              make_case(pieces, p, 0.5, group=everyone, label="new_group(all)")) for p in [2.0, 3.0, INF, -INF]]
    results = run_cases(worlds(world_size), [c for pair in pairs for c in pair])
    for i, (world_case, full_case) in enumerate(pairs):
        a, b = results[2 * i], results[2 * i + 1]
        check_ok(world_case, a)
        check_ok(full_case, b)
        for r in range(world_size):
            assert_bitwise(a[r]["norm"], b[r]["norm"], f"p={world_case['norm_type']} rank {r}")
            for ga, gb in zip(a[r]["grads"], b[r]["grads"]):
                if ga is not None:
                    assert_bitwise(ga, gb, f"p={world_case['norm_type']} rank {r} grads")


def test_deprecated_alias_and_single_tensor_parameters(worlds):
    """clip_grad_norm (deprecated) with group= warns FutureWarning and clips like clip_grad_norm_; a single
    Tensor as parameters works in sharded mode."""
    values = logical_vector(seed=18, shapes=[(5,), (3, 2), (4,)])
    pieces = [[v] for v in values]
    ref = reference_norm(values, 2.0)
    alias = make_case(pieces, 2.0, 0.37 * ref, api="alias", label="alias")
    single = make_case(pieces, 2.0, 0.37 * ref, container="tensor", label="single tensor")
    alias_results, single_results = run_cases(worlds(3), [alias, single])
    check_ok(alias, alias_results)
    check_ok(single, single_results)
    for res in alias_results:
        assert [c for c, _ in res["warnings"]] == [FutureWarning], res["warnings"]
    for res in single_results:
        assert res["warnings"] == [], res["warnings"]


# --------------------------------------------------------------------------------------------------------
# Gradients that are the consecutive views of one buffer (ZeRO partitions, FSDP1 flat shards, DDP buckets) are
# read and scaled as one flat tensor; anything else takes the per-tensor path. Both must give the same numbers.

FLAT_ARRANGEMENTS = ("consecutive", "gap", "reversed", "transposed", "other_dtype_view", "separate")


def _arranged(arrangement, rank, dtype):
    """This rank's gradients, all taken from ``buffer`` (a random 1-D tensor), in ``arrangement``."""
    gen = torch.Generator().manual_seed(100 + rank)
    buffer = (torch.randn(1200, generator=gen) * 10.0 ** (rank - 1)).to(dtype)
    sizes = [5, 300, 1, 64, 400, 30]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if arrangement == "gap":
        starts = [s + 2 * i for i, s in enumerate(starts)]
    views = [buffer[s:s + n] for s, n in zip(starts, sizes)]
    if arrangement == "reversed":
        views = views[::-1]
    elif arrangement == "transposed":
        views[3] = buffer[starts[3]:starts[3] + 64].view(8, 8).t()
    elif arrangement == "other_dtype_view" and dtype == torch.float32:
        views[2] = buffer[starts[2]:starts[2] + 1].view(torch.int32).view(torch.float32)[:0]
    elif arrangement == "separate":
        views = [v.clone() for v in views]
    return buffer, views


def _rank_flat_views(arrangement, dtype, norm_type, max_norm):
    from distclip._clip import layout as _layout

    rank = dist.get_rank()
    buffer, views = _arranged(arrangement, rank, dtype)
    params = [torch.nn.Parameter(torch.zeros(v.shape, dtype=dtype)) for v in views]
    for p, v in zip(params, views):
        p.grad = v
    flat = _layout.of_parameters(params, dist.group.WORLD).flat is not None
    before = [v.double().clone() for v in views]
    norm = distclip.clip_grad_norm_(params, max_norm, norm_type, group=dist.group.WORLD)
    return dict(flat=flat, norm=norm.item(), before=before, after=[p.grad.double() for p in params],
                same_objects=all(p.grad is v for p, v in zip(params, views)), untouched=buffer[1150:].clone())


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_of_one_buffer_norm_and_scale_like_separate_tensors(worlds, norm_type, dtype):
    for arrangement in FLAT_ARRANGEMENTS:
        results = worlds(2).run(_rank_flat_views, arrangement, dtype, norm_type, 0.5)
        # float64 reference of every rank's gradients before the call
        values = torch.cat([v.reshape(-1) for r in results for v in r["before"]])
        reference = torch.linalg.vector_norm(values, norm_type).item()
        expect_flat = arrangement in ("consecutive", "other_dtype_view") and not (
            arrangement == "other_dtype_view" and dtype == torch.float32)
        for rank, r in enumerate(results):
            label = f"{arrangement} {dtype} p={norm_type} rank {rank}"
            assert r["flat"] == expect_flat, label
            assert r["norm"] == results[0]["norm"] and math.isclose(r["norm"], reference, rel_tol=1e-6), label
            coefficient = min(0.5 / (r["norm"] + 1e-6), 1.0)
            assert r["same_objects"], label
            for before, after in zip(r["before"], r["after"]):
                # each element scaled once, in float32 arithmetic (torch's opmath for float32 and bfloat16)
                expected = (before.float() * torch.tensor(coefficient, dtype=torch.float32)).to(dtype).double()
                assert torch.equal(after, expected), label
        assert all(torch.equal(r["untouched"], _arranged(arrangement, rank, dtype)[0][1150:])
                   for rank, r in enumerate(results)), "elements outside the gradients changed"


def _large_gradients(rank, dtype):
    gen = torch.Generator().manual_seed(7 + rank)
    # Equal elements are the hard case for a kernel that accumulates in a few running float32 sums; the last two
    # values are the worst found for torch's float32 norm kernel over rows of 1024 elements (1.5e-5 of error for
    # p = 1 and 0.5, where it reads the 2-norm's rows to 2e-6).
    return [torch.full((1 << 21,), 0.1 * (rank + 1)).to(dtype), (torch.randn(1 << 20, generator=gen) * 3).to(dtype),
            torch.full((1000, 300), 0.3).to(dtype).t(), (torch.randn(512, 512, generator=gen) * 1e20).to(dtype).t(),
            torch.full((1 << 20,), 0.13203048706054688).to(dtype), torch.full((1 << 20,), 0.2698335647583008).to(dtype)]


def _rank_large_norms(dtype, norm_types):
    grads = _large_gradients(dist.get_rank(), dtype)
    return [[distclip.get_total_norm(gs, p, group=dist.group.WORLD).item() for gs in [grads, *([g] for g in grads)]]
            for p in norm_types]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_meet_the_accuracy_contract(worlds, dtype):
    """API.md: relative error under 1e-5 against float64, also for tensors of millions of equal elements,
    where torch's float32 norm kernels are off by 4e-4 (2M elements, p=2): the norm of all the tensors (within
    1e-6), and of each tensor alone, where one kind of element does not hide another's error."""
    norm_types = [2.0, 1.0, 3.0, 0.5, 9.0]
    results = worlds(2).run(_rank_large_norms, dtype, norm_types)
    by_rank = [_large_gradients(rank, dtype) for rank in range(2)]
    sets = [[g for grads in by_rank for g in grads], *zip(*by_rank)]
    for i, p in enumerate(norm_types):
        for j, tensors in enumerate(sets):
            reference = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in tensors]), p).item()
            for rank, norms in enumerate(results):
                error = abs(norms[i][j] - reference) / reference
                assert error < (1e-6 if j == 0 else 1e-5), (dtype, p, j, rank, norms[i][j], reference)


def test_one_view_only_for_consecutive_contiguous_views_of_one_storage():
    from distclip._clip.layout import _one_view

    buffer = torch.arange(12.0)
    assert torch.equal(_one_view([buffer[:5], buffer[5:9].view(2, 2), buffer[9:]]), buffer)
    assert torch.equal(_one_view([buffer[2:4], buffer[4:7]]), buffer[2:7])  # a part of the buffer
    assert _one_view([buffer[:4]]) is None  # one tensor is its own view already
    assert _one_view([buffer[0:4:2], buffer[4:8]]) is None  # strided: its elements are not its byte range
    assert _one_view([buffer[4:8], buffer[:4]]) is None  # out of order
    assert _one_view([buffer[:4], buffer[4:8].view(torch.int32)]) is None  # another dtype over the same bytes
    assert _one_view([buffer[:4], torch.zeros(4)]) is None  # another storage
    assert _one_view([buffer[:0], buffer[:0]]) is None  # no element
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    assert _one_view([sparse, buffer[:3]]) is None and _one_view([buffer[:3], sparse]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_gradients_are_normed_without_a_copy_of_their_size(dtype):
    """Item 7 of issue 8: no temporary the size of a gradient, also for gradients that are not contiguous (a
    float64 kernel would upcast a copy of the whole tensor, 64 MiB here, and aminmax would copy it). Dense
    permutations (a transpose, channels_last) are read as they lie; tensors with gaps or repeats a slice at a
    time through the buffer."""
    from distclip._tools.bench import peak_extra_bytes
    from distclip._clip.partials import local_norm

    base = torch.randn(1 << 23, generator=torch.Generator().manual_seed(3)).to(dtype)
    cases = {
        "transposed": [base.view(2048, 4096).t()],
        "gapped": [base.view(4096, 2048)[:, 5:1000]],
        "gapped 3-d": [base.view(8, 1024, 1024)[:, :, 3:900].transpose(0, 2)],
        "every other": [base[::2]],
        "expanded": [base[:4096].view(1, 4096).expand(1024, 4096)],
        "channels_last": [base[: 64 * 256 * 9].view(64, 256, 3, 3).contiguous(memory_format=torch.channels_last)],
        "zeros, transposed": [torch.zeros(2048, 4096, dtype=dtype).t()],
    }
    for name, grads in cases.items():
        for p in (2.0, 3.0, math.inf, -math.inf):
            reference = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]), p).item()
            norm = local_norm(grads, p, None, torch.device("cpu")).item()
            assert abs(norm - reference) <= 1e-6 * reference, (name, p, norm, reference)
            peak = peak_extra_bytes(lambda: local_norm(grads, p, None, torch.device("cpu")))
            assert peak is not None and peak <= 4 << 20, (name, p, peak)
