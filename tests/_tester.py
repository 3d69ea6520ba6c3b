"""The shared base of the clip's tests: run a function on every rank of a live world, check every rank's answer.

A distributed test here has two halves. The *rank side* runs inside the gloo workers of ``_world`` (the
``worlds`` fixture): it builds this rank's gradients, clips them, and records what the test checks (the
norm, the gradients after the clip, the collectives counted with ``CommDebugMode`` on real gloo, any
exception). The *test side* runs in the test process: it computes the float64 reference of the unsharded
gradients and checks every rank's record against it with the assertions below. Rank-side functions must be
module-level (the harness pickles them by reference); :func:`run_cases` sends many cases to every rank in one
round trip, since a round trip costs more than most cases.

The one-process half (:class:`Spec`, :func:`compare`) checks distclip bitwise against ``torch.nn.utils`` on
twin parameters.

Nothing is mocked. The names here are imported by test files in several folders: keep them stable.
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.utils as tnu
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

import distclip

INF, NAN = math.inf, math.nan
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Every norm type torch.nn.utils takes on one process: floats, ints, strings, 0 and large p.
TORCH_NORM_TYPES = [0.5, 1, 1.0, 2, 2.0, 3.0, 4.5, math.inf, -math.inf, 0, 0.0, "inf", "-inf", "2"]
# A sharded norm against the float64 reference (the documented accuracy).
REL_TOL = 1e-5
# Gradients after a clip: the coefficient carries the norm's relative error, plus float32 rounding.
GRAD_RTOL, GRAD_ATOL = 2e-5, 1e-7


# --------------------------------------------------------------------------------------------------------
# Rank side: runs inside the gloo workers.
# --------------------------------------------------------------------------------------------------------

_MESHES: dict = {}
_SUBGROUPS: dict = {}


def grad_params(values):
    """Parameters whose ``.grad`` are private copies of ``values`` (``None``: a parameter without grad)."""
    params = []
    for value in values:
        if value is None:
            params.append(torch.zeros(2, requires_grad=True))
        else:
            param = torch.zeros_like(value).requires_grad_()
            param.grad = value.clone()
            params.append(param)
    return params


def cached_mesh(shape, names=None):
    """A CPU device mesh over the world, made once per world (every rank asks for the same meshes in the same
    order, as ``init_device_mesh`` requires)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def cached_subgroup(partition):
    """This rank's group in ``partition`` (a tuple of rank tuples covering the world). Made once per world;
    every rank calls this with the same partitions in the same order, as ``new_group`` requires."""
    if partition not in _SUBGROUPS:
        _SUBGROUPS[partition], _ = dist.new_subgroups_by_enumeration([list(ranks) for ranks in partition])
    return _SUBGROUPS[partition]


def local(t):
    """A DTensor's local shard; a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def snapshot(params):
    """Copies of the local gradients of ``params`` (``None`` where a parameter has none)."""
    return [None if p.grad is None else local(p.grad).detach().clone() for p in params]


@torch.no_grad()
def restore(params, saved):
    for p, grad in zip(params, saved):
        if grad is not None:
            local(p.grad).copy_(grad)


@torch.no_grad()
def average_grads(params, group=None):
    """Average the gradients of ``params`` over ``group`` (all-reduce SUM / size), as data parallelism does."""
    size = dist.get_world_size(group)
    for p in params:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)


def norm_record(norm):
    """What the tests check of a returned norm: its type, placements, dtype and (full) value."""
    is_dtensor = isinstance(norm, DTensor)
    return dict(
        kind="DTensor" if is_dtensor else type(norm).__name__,
        placements=tuple(norm.placements) if is_dtensor else None,
        dtype=norm.dtype,
        value=(norm.full_tensor() if is_dtensor else norm).detach().clone(),
    )


def clip_once(params, saved, clip):
    """Restore the gradients of ``params`` to ``saved``, run ``clip()`` counting its collectives, and record
    the returned norm and the gradients afterwards (what :func:`check_clip` checks)."""
    restore(params, saved)
    with CommDebugMode() as mode:
        norm = clip()
    return dict(norm=norm_record(norm), comms=mode.get_total_counts(), grads=snapshot(params))


def attempt(call, params):
    """(exception type, message, collectives, gradients unchanged) of ``call()``; the type is None if it
    returned."""
    saved = snapshot(params)
    error = None
    with CommDebugMode() as mode:
        try:
            call()
        except Exception as err:  # compared with the expected outcome by the test
            error = err
    unchanged = all(torch.equal(a, b) for a, b in zip(saved, snapshot(params)) if a is not None)
    return (type(error) if error else None, str(error), mode.get_total_counts(), unchanged)


class _OnEachCase:
    """``rank_fn`` applied to each case of a list, on one rank (named after ``rank_fn`` in the harness's
    messages)."""

    def __init__(self, rank_fn):
        self.rank_fn = rank_fn
        self.__name__ = rank_fn.__name__

    def __call__(self, cases):
        return [self.rank_fn(case) for case in cases]


# --------------------------------------------------------------------------------------------------------
# Running: many cases on every rank, in one round trip.
# --------------------------------------------------------------------------------------------------------


def run_cases(world, rank_fn, cases, isolated=False):
    """``rank_fn(case)`` on every rank of ``world`` for each case; ``result[i][r]`` is rank r's answer to case
    i. All in one round trip, or with ``isolated`` one round trip per case: where a case may leave a rank
    behind in a collective (the tests of errors, which use a fresh group with a short timeout), the next case
    then still starts on every rank together and the failure is reported against the case that caused it."""
    batches = [[case] for case in cases] if isolated else [cases]
    results = []
    for batch in batches:
        per_rank = world.run(_OnEachCase(rank_fn), batch)
        results += [[per_rank[r][i] for r in range(world.world_size)] for i in range(len(batch))]
    return results


def per_rank(results, i):
    """Case ``i`` of every rank's list of results (``results[r]`` is rank r's list, as ``World.run`` returns
    for a rank function that answers a list of cases)."""
    return [rank_results[i] for rank_results in results]


# --------------------------------------------------------------------------------------------------------
# Test side: the float64 reference.
# --------------------------------------------------------------------------------------------------------


def reference_norm(values, norm_type) -> float:
    """The p-norm of the concatenation of ``values`` in float64 (scaled by the max, so no float64 overflow);
    ``None`` entries skipped; NaN if any value is NaN, 0.0 for no values."""
    p = float(norm_type)
    values = [v for v in values if v is not None]
    if not values or sum(v.numel() for v in values) == 0:
        return 0.0
    x = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values]).abs()
    if x.isnan().any():
        return NAN
    if p == INF:
        return x.max().item()
    if p == -INF:
        return x.min().item()
    m = x.max().item()
    if m == 0.0 or math.isinf(m):
        return m
    return m * torch.linalg.vector_norm(x / m, p).item()


def clip_coefficient(max_norm, norm) -> float:
    """The coefficient every clip scales by: ``min(max_norm / (norm + 1e-6), 1)`` (NaN stays NaN)."""
    return min(max_norm / (norm + 1e-6), 1.0)


def scaled(grads, coef):
    """``grads`` in float64 times ``coef``."""
    return [None if g is None else g.to(torch.float64) * coef for g in grads]


def clips_for(ref_grads, norm_types, fraction=0.5):
    """(norm_type, max_norm) pairs whose max_norm is ``fraction`` of the reference norm: every clip scales."""
    return [(p, fraction * reference_norm(ref_grads, p)) for p in norm_types]


# --------------------------------------------------------------------------------------------------------
# Test side: assertions.
# --------------------------------------------------------------------------------------------------------


def bits(t):
    """The bytes of ``t``, so that NaN payloads and signed zeros compare too (with ``torch.equal``)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(a, b, what=""):
    """Same dtype, device, shape and bytes."""
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, (
        f"{what}: {a.dtype}{tuple(a.shape)} on {a.device} vs {b.dtype}{tuple(b.shape)} on {b.device}")
    assert torch.equal(bits(a), bits(b)), f"{what}: not bitwise equal:\n{a}\n{b}"


def assert_norm_close(got, ref, what, rel=REL_TOL):
    """``got`` within ``rel`` of the reference; a NaN, infinite or zero reference exactly."""
    if math.isnan(ref):
        assert math.isnan(got), f"{what}: got {got!r}, expected NaN"
    elif math.isinf(ref) or ref == 0.0:
        assert got == ref, f"{what}: got {got!r}, expected {ref!r}"
    else:
        assert math.isfinite(got) and abs(got - ref) <= rel * abs(ref), (
            f"{what}: got {got!r}, expected {ref!r} (rel error {abs(got - ref) / abs(ref):.3g})")


def assert_grads_unchanged(before, after, what):
    """The gradients after are bitwise the ones before (``None`` stays ``None``)."""
    assert len(before) == len(after), what
    for i, (b, a) in enumerate(zip(before, after)):
        if b is None:
            assert a is None, f"{what}: grad {i} appeared"
        else:
            assert_bitwise(b, a, f"{what}: grad {i} changed")


def assert_grads_scaled(before, after, coef, what):
    """``after == before * coef`` (coef in float64): bitwise where coef is 1, else within the rounding of
    the gradient's dtype."""
    if coef == 1.0:
        return assert_grads_unchanged(before, after, what)
    for i, (b, a) in enumerate(zip(before, after)):
        if b is None:
            assert a is None, f"{what}: grad {i} appeared"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: grad {i} dtype/shape"
        info = torch.finfo(b.dtype)
        torch.testing.assert_close(
            a.to(torch.float64), b.to(torch.float64) * coef, rtol=1e-6 + 2 * info.eps,
            atol=info.smallest_normal * info.eps, equal_nan=True, msg=lambda m: f"{what}: grad {i}: {m}",
        )


def assert_grads_close(after, expected, what, rtol=GRAD_RTOL, atol=GRAD_ATOL):
    """The gradients after close to ``expected`` in float64 (``None`` stays ``None``)."""
    assert len(after) == len(expected), f"{what}: {len(after)} grads vs {len(expected)}"
    for i, (a, e) in enumerate(zip(after, expected)):
        if e is None:
            assert a is None, f"{what}: grad {i} appeared"
            continue
        assert a is not None and a.shape == e.shape, f"{what}: grad {i}: {a!r} vs shape {tuple(e.shape)}"
        torch.testing.assert_close(a.to(torch.float64), e.to(torch.float64), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: grad {i}: {m}")


def check_clip(record, before, ref, max_norm, comms, what, kind="Tensor"):
    """One rank's :func:`clip_once` record: the norm is close to the finite ``ref`` and of type ``kind``, it
    made ``comms`` collectives, and the gradients are the ones before times the reference coefficient."""
    norm = record["norm"]
    assert norm["kind"] == kind, f"{what}: returned a {norm['kind']}, expected a {kind}"
    assert norm["value"].dim() == 0, f"{what}: the norm has shape {tuple(norm['value'].shape)}"
    assert math.isfinite(ref), f"{what}: the reference {ref!r} is not finite"
    assert_norm_close(norm["value"].item(), ref, what)
    assert record["comms"] == comms, f"{what}: {record['comms']} collectives, expected {comms}"
    assert_grads_close(record["grads"], scaled(before, clip_coefficient(max_norm, ref)), f"{what}: grads")


def check_same_on_every_rank(records, what):
    """The norm of every rank's :func:`clip_once` record is bitwise the same value (and dtype)."""
    first = records[0]["norm"]["value"]
    for r, record in enumerate(records):
        value = record["norm"]["value"]
        assert value.dtype == first.dtype and torch.equal(value, first), (
            f"{what}: rank {r} returned {value!r}, rank 0 {first!r}")


def check_matches_framework(ours, theirs, what):
    """distclip's norm within 1e-5 of the framework's, and its gradients after the clip close to theirs."""
    assert_norm_close(ours["norm"]["value"].item(), theirs["norm"]["value"].item(), f"{what} vs framework")
    assert_grads_close(ours["grads"], theirs["grads"], f"{what}: grads vs framework's", rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# One process: bitwise parity with torch.nn.utils on twin parameters.
# --------------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """Parameters to build: (shape, dtype, has_grad, scale) each; values injected at flat positions."""

    tensors: list = field(default_factory=list)
    inject: dict = field(default_factory=dict)  # tensor index -> value put at its first element
    seed: int = 0

    def build(self) -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(self.seed)
        params = []
        for i, (shape, dtype, has_grad, scale) in enumerate(self.tensors):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
            if has_grad:
                p.grad = (torch.randn(shape, generator=gen) * scale).to(dtype)
                if i in self.inject and p.grad.numel():
                    p.grad.view(-1)[0] = self.inject[i]
            params.append(p)
        return params


def simple_spec(dtypes=(torch.float32,), scale=10.0, grads=True, **kw) -> Spec:
    """One (3, 4) parameter per dtype in ``dtypes``, with gradients of ``randn * scale`` (or none)."""
    return Spec([((3, 4), d, grads, scale) for d in dtypes], **kw)


def call(fn, *args, **kwargs):
    """(result or exception, warnings) of one call; both libraries are called from this same line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # compared with torch's by the caller
            out = err
    return out, [(w.category, str(w.message), w.filename, w.lineno) for w in caught]


def as_form(params: list, form: str):
    """``params`` as a list, tuple, generator or (one) tensor."""
    return {"list": lambda: params, "tuple": lambda: tuple(params), "generator": lambda: (p for p in params),
            "tensor": lambda: params[0]}[form]()


def compare(spec: Spec, name: str, form: str = "list", ours=None, **kwargs) -> object:
    """Run ``name`` from torch.nn.utils and from distclip (or ``ours``) on twin parameters and assert parity:
    the returned value (bits, dtype, device), the gradients after the call (bits, and the same tensor
    objects), the warnings (category, message, line) and the exceptions (type and message). Returns torch's
    result."""
    theirs, ours_params = spec.build(), spec.build()
    their_grads = [p.grad for p in theirs]
    our_grads = [p.grad for p in ours_params]
    expected, their_warnings = call(getattr(tnu, name), as_form(theirs, form), **kwargs)
    got, our_warnings = call(getattr(distclip, name) if ours is None else ours, as_form(ours_params, form), **kwargs)
    if isinstance(expected, Exception):
        assert type(got) is type(expected) and str(got) == str(expected), (got, expected)
    elif isinstance(expected, torch.Tensor):
        assert_bitwise(got, expected, "the returned value")
        assert not got.requires_grad and got.grad_fn is None
    else:
        assert got is None and expected is None
    assert our_warnings == [(c, m.replace("torch.nn.utils", "distclip"), f, n) for c, m, f, n in their_warnings]
    for p, q, g_ours, g_theirs in zip(ours_params, theirs, our_grads, their_grads):
        assert p.grad is g_ours, "gradients must be changed in place, not replaced"
        if g_theirs is not None:
            assert_bitwise(p.grad, q.grad, "a gradient after the call")
        assert not p.grad_fn and (p.grad is None or p.grad.grad_fn is None)
    return expected
