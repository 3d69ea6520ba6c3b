"""The cases of the sharded tests (``group=``): every rank holds a disjoint piece of one logical gradient vector.

A test builds the logical vector and its pieces in the test process (:func:`logical_vector` and a cut), makes
:class:`Case` objects (one call each, on every rank or on its members), and :func:`run_sharded` sends every rank
the list of all ranks' pieces and lets each clip its own on a real gloo world. What comes back per rank (a
:class:`RankOutcome`: the returned norm, the gradients afterwards, the collectives counted, any exception and
warning) is checked against the float64 reference of the concatenated pieces by :func:`check_ok` or
:func:`check_raises`. Many cases go to the world in one round trip; every case carries a label that the
assertion messages name.
"""

import math
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from _tester import (
    assert_bitwise,
    assert_grads_scaled,
    assert_grads_unchanged,
    assert_norm_close,
    clip_coefficient,
    grad_params,
    reference_norm,
    run_cases,
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

WORLD = "WORLD"  # a case's group: dist.group.WORLD


@dataclass(frozen=True)
class FreshGroup:
    """A case's group: a new group of ``ranks`` with a timeout of ``SHORT_TIMEOUT_S``, made for that case."""

    ranks: tuple


# --------------------------------------------------------------------------------------------------------
# The calls a case makes on each rank (module-level functions: a case carries one to the ranks by name).
# --------------------------------------------------------------------------------------------------------


def _parameters_arg(params, container):
    if container == "generator":
        return (p for p in params)
    if container == "tensor":
        (param,) = params
        return param
    return params


def clip(case, params, group, extra):
    """``distclip.clip_grad_norm_`` of the parameters, passed as the case's container."""
    return distclip.clip_grad_norm_(_parameters_arg(params, case.container), case.max_norm, **case.kwargs(),
                                    group=group)


def alias(case, params, group, extra):
    """The deprecated ``distclip.clip_grad_norm``."""
    return distclip.clip_grad_norm(params, case.max_norm, **case.kwargs(), group=group)


def total(case, params, group, extra):
    """``distclip.get_total_norm`` of the gradients (they stay as they are)."""
    return distclip.get_total_norm([p.grad for p in params if p.grad is not None], **case.kwargs(), group=group)


def total_then_scale(case, params, group, extra):
    """``get_total_norm`` then ``clip_grads_with_norm_`` (its collectives counted apart, in ``scale_comms``)."""
    norm = total(case, params, group, extra)
    with CommDebugMode() as scale_mode:
        distclip.clip_grads_with_norm_(params, case.max_norm, norm, foreach=case.foreach)
    extra["scale_comms"] = scale_mode.get_total_counts()
    return norm


SCALING_CALLS = (clip, alias, total_then_scale)


@dataclass
class Case:
    """One call on every rank (or on ``members`` only): ``pieces[r]`` is rank r's list of grads (``None``: a
    parameter without grad); ``group`` is None, ``WORLD``, a tuple of ranks (a group made once per world) or a
    :class:`FreshGroup`."""

    pieces: list
    norm_type: object = 2.0
    max_norm: object = None
    api: object = clip
    group: object = WORLD
    members: tuple | None = None
    foreach: bool | None = None
    error_if_nonfinite: bool = False
    container: str = "list"
    label: str = ""

    def kwargs(self):
        return dict(norm_type=self.norm_type, error_if_nonfinite=self.error_if_nonfinite, foreach=self.foreach)

    @property
    def what(self):
        return (f"{self.label} api={self.api.__name__} p={self.norm_type!r} max_norm={self.max_norm!r} "
                f"foreach={self.foreach} group={self.group}")

    def member_ranks(self, world_size):
        return list(range(world_size)) if self.members is None else list(self.members)

    def group_ranks(self, world_size):
        if self.group in (None, WORLD):
            return range(world_size)
        return self.group.ranks if isinstance(self.group, FreshGroup) else self.group

    def reference(self, world_size):
        """The reference norm: over the pieces of the group's ranks."""
        return reference_norm([g for r in self.group_ranks(world_size) for g in self.pieces[r]], self.norm_type)


@dataclass
class RankOutcome:
    """What one rank reports of one case (``norm``, ``error`` and ``comms`` stay None on a non-member)."""

    grads: list
    norm: torch.Tensor | None = None
    error: tuple | None = None  # (type, message)
    comms: int | None = None
    warnings: list = field(default_factory=list)  # (category, message)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Rank side: runs inside the gloo workers.
# --------------------------------------------------------------------------------------------------------

_CACHED_GROUPS: dict = {}


def _rank_group(spec):
    """The process group a case names. Every rank calls this, members or not, in the same order, as
    ``dist.new_group`` requires."""
    if spec is None:
        return None
    if spec == WORLD:
        return dist.group.WORLD
    if isinstance(spec, FreshGroup):
        return dist.new_group(list(spec.ranks), timeout=timedelta(seconds=SHORT_TIMEOUT_S))
    if spec not in _CACHED_GROUPS:
        _CACHED_GROUPS[spec] = dist.new_group(list(spec))
    return _CACHED_GROUPS[spec]


def rank_run_case(case):
    rank = dist.get_rank()
    group = _rank_group(case.group)
    params = grad_params(case.pieces[rank])
    out = RankOutcome(grads=[])
    if case.members is None or rank in case.members:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mode = CommDebugMode()
            try:
                with mode:
                    out.norm = case.api(case, params, group, out.extra)
            except Exception as err:  # compared with the expected outcome by the test
                out.error = (type(err), str(err))
            out.comms = mode.get_total_counts()
        out.warnings = [(w.category, str(w.message)) for w in caught]
    out.grads = [p.grad for p in params]
    return out


def run_sharded(world, cases, isolated=False):
    """Run ``cases``: ``result[i][r]`` is rank r's :class:`RankOutcome` of case i (see ``_tester.run_cases``
    for ``isolated``)."""
    return run_cases(world, rank_run_case, cases, isolated)


# --------------------------------------------------------------------------------------------------------
# Test side: logical vectors and their cuts over the ranks.
# --------------------------------------------------------------------------------------------------------


def logical_vector(seed, shapes=SHAPES, dtypes=(torch.float32,), scale=1.0):
    """Seeded tensors of ``shapes``, dtypes cycling through ``dtypes``, values ``randn * scale``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)])
        for i, shape in enumerate(shapes)
    ]


def flat(values):
    return torch.cat([v.reshape(-1) for v in values])


def cut_round_robin(values, n, rng):
    """Whole tensors per rank, tensor i on rank i % n; every rank also has a parameter without grad."""
    pieces = [[None] for _ in range(n)]
    for i, v in enumerate(values):
        pieces[i % n].insert(-1 if i % 2 else 0, v)
    return pieces


def _flat_chunks(values, n, pad):
    vector = flat(values)
    chunk = -(-vector.numel() // n)
    if pad:
        vector = torch.cat([vector, vector.new_zeros(chunk * n - vector.numel())])
    return [[vector[r * chunk:(r + 1) * chunk]] for r in range(n)]


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
    vector = flat(values)
    pieces = []
    for lo, hi in _uneven_ranges(vector.numel(), n, rng):
        piece = vector[lo:hi]
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
        buffer = flat([v for v in values if v.dtype == dtype])
        if buffer.numel() < n:
            pieces[rng.randrange(n)].append(buffer)
            continue
        for r, (lo, hi) in enumerate(_uneven_ranges(buffer.numel(), n, rng)):
            pieces[r].append(buffer[lo:hi])
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


def with_value(pieces, rank, value):
    """A copy of ``pieces`` where the first element of ``rank``'s first grad is ``value``."""
    pieces = [list(p) for p in pieces]
    grad = pieces[rank][0].clone()
    grad.view(-1)[0] = value
    pieces[rank][0] = grad
    return pieces


# --------------------------------------------------------------------------------------------------------
# Test side: checks of every rank's outcome.
# --------------------------------------------------------------------------------------------------------


def check_ok(case, results, ref=None):
    """Every calling rank returned the same float64 0-d CPU norm (bitwise), close to the float64 reference,
    from exactly one collective; it scaled its grads by the reference coefficient (the scaling calls) or left
    them alone (``total``); the ranks that did not call have their grads untouched. Returns the norm."""
    world_size = len(results)
    label = case.what
    members = case.member_ranks(world_size)
    ref = case.reference(world_size) if ref is None else ref
    errors = [f"rank {r}: {results[r].error[0].__name__}: {results[r].error[1]}"
              for r in members if results[r].error is not None]
    assert not errors, f"{label}: " + "; ".join(errors)
    norms = [results[r].norm for r in members]
    first = norms[0]
    assert isinstance(first, torch.Tensor) and first.dtype == torch.float64 and first.dim() == 0, (
        f"{label}: returned {first!r}, expected a float64 0-d tensor")
    assert first.device.type == "cpu", f"{label}: norm on {first.device}"
    for r, norm in zip(members, norms):
        assert_bitwise(norm, first, f"{label}: norm on rank {r} vs rank {members[0]}")
        assert results[r].comms == 1, f"{label}: rank {r} made {results[r].comms} collectives, expected 1"
    assert_norm_close(first.item(), ref, label)
    for r in range(world_size):
        before, after = case.pieces[r], results[r].grads
        if r in members and case.api in SCALING_CALLS:
            assert_grads_scaled(before, after, clip_coefficient(case.max_norm, ref), f"{label} rank {r}")
        else:
            assert_grads_unchanged(before, after, f"{label} rank {r}")
    return first


def check_rank_raised(case, results, r, exc_types, comms, match=None):
    """Rank r raised one of ``exc_types`` (with ``match`` in the message) after ``comms`` collectives, and
    its grads are bitwise unchanged."""
    label = case.what
    error = results[r].error
    assert error is not None, f"{label}: rank {r} did not raise, returned {results[r].norm!r}"
    assert issubclass(error[0], exc_types), f"{label}: rank {r} raised {error[0].__name__}: {error[1]}"
    if match is not None:
        assert match in error[1], f"{label}: rank {r}: {match!r} not in message {error[1]!r}"
    assert results[r].comms == comms, f"{label}: rank {r} made {results[r].comms} collectives"
    assert_grads_unchanged(case.pieces[r], results[r].grads, f"{label} rank {r}")


def check_raises(case, results, exc_types, comms, match=None):
    """Every rank raised (see :func:`check_rank_raised`)."""
    for r in range(len(results)):
        check_rank_raised(case, results, r, exc_types, comms, match)


def clip_cases(pieces, norm_type, label, ref):
    """The standard trio on one layout: a clip that scales (coef about 0.37, foreach=None), a clip with a
    max_norm so large that coef is 1 (foreach=False), and get_total_norm of the grads (foreach=True)."""
    return [
        Case(pieces, norm_type, 0.37 * ref, label=label),
        Case(pieces, norm_type, INF, foreach=False, label=label),
        Case(pieces, norm_type, api=total, foreach=True, label=label),
    ]


def run_and_check(world, cases):
    """Run ``cases`` in one round trip and :func:`check_ok` each."""
    for case, results in zip(cases, run_sharded(world, cases)):
        check_ok(case, results)
