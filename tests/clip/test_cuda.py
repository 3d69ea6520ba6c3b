"""Parity and sharded clipping on a GPU: what tests/clip/test_parity_*.py and test_sharded_*.py check on the CPU.

The device is ``DISTCLIP_TEST_DEVICE`` (default ``cuda``); without CUDA the module is skipped, so the CPU suite
does not run it. ``benchmarks/gpu_check.sh`` runs it on the GPU, and its ``--dry-run`` runs it with
``DISTCLIP_TEST_DEVICE=cpu`` (the same checks on CPU tensors: this module's logic, not the GPU's kernels).

- Parity (one process): ``distclip.clip_grad_norm_``, ``get_total_norm``, ``clip_grads_with_norm_`` and
  ``clip_grad_value_`` against ``torch.nn.utils`` on device tensors of every dtype, mixed dtypes, every norm
  type, ``foreach`` None/True/False: the same bits, dtype and device of the norm, and of the gradients.
- Sharded: 2 gloo ranks on the one GPU, each with its pieces on it (gloo reduces the float64 rows on the
  host): the norm of the whole vector (rel 1e-5 against float64 on the CPU) with the same bits on every rank,
  on the gradients' device; declared replicas counted once; gradients near 1e19 (float32 squares overflow)
  and fp16 gradients whose norm passes 65504; a NaN on one rank gives NaN on every rank, for inf too; a rank
  with no gradients; the gradients scaled by the reference coefficient.

The one-rank NCCL group and the absence of host synchronisation are ``benchmarks/gpu_sync_check.py``'s.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.utils as tnu

import distclip

from _tester import assert_bitwise, bits

DEVICE = os.environ.get("DISTCLIP_TEST_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("no CUDA device (benchmarks/gpu_check.sh runs this module on a GPU)", allow_module_level=True)

INF = math.inf
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NORM_TYPES = (2.0, 1.0, 0.5, 3.0, INF, -INF, 0.0)
SHARDED_NORM_TYPES = (2.0, 1.0, 3.0, INF, -INF)
SHAPES = ((33, 17), (5,), (0,), (128, 64), (1,))
TIMEOUT_S = 120


def _params(dtypes, seed, scale=1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
        params.append(p)
    return params


def _outcome(fn, *args, **kwargs):
    """The result, or the exception's type and message (torch raises for some inputs; distclip must too)."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        return (type(err), str(err))


def _same(a, b, what):
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b, (what, a, b)
        return
    assert_bitwise(a, b, what)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("dtypes", [(d,) for d in DTYPES] + [DTYPES], ids=lambda d: "+".join(str(x)[6:] for x in d))
def test_parity_with_torch_on_device(dtypes, foreach):
    for p in NORM_TYPES:
        for scale in (1.0, 1e-3):
            theirs, ours = _params(dtypes, 1, scale), _params(dtypes, 1, scale)
            what = (dtypes, foreach, p, scale)
            _same(_outcome(tnu.clip_grad_norm_, theirs, 1.0, p, foreach=foreach),
                  _outcome(distclip.clip_grad_norm_, ours, 1.0, p, foreach=foreach), what)
            for a, b in zip(theirs, ours):
                _same(a.grad, b.grad, what)
            tensors = [q.grad for q in _params(dtypes, 2, scale)]
            _same(_outcome(tnu.get_total_norm, tensors, p, foreach=foreach),
                  _outcome(distclip.get_total_norm, tensors, p, foreach=foreach), what)
        theirs, ours = _params(dtypes, 3), _params(dtypes, 3)
        norm = torch.tensor(7.5, device=DEVICE)
        tnu.clip_grads_with_norm_(theirs, 1.0, norm, foreach=foreach)
        distclip.clip_grads_with_norm_(ours, 1.0, norm, foreach=foreach)
        tnu.clip_grad_value_(theirs, 0.1, foreach=foreach)
        distclip.clip_grad_value_(ours, 0.1, foreach=foreach)
        for a, b in zip(theirs, ours):
            _same(a.grad, b.grad, (dtypes, foreach, "with_norm + value"))


# --------------------------------------------------------------------------------------------------------
# Sharded: the rank side runs in the gloo workers, every rank's tensors on the one device.
# --------------------------------------------------------------------------------------------------------

# A case: (label, dtype, scale, inject) where inject is (rank, value) put into that rank's first gradient.
CASES = [
    ("float32", torch.float32, 1.0, None),
    ("bf16", torch.bfloat16, 1.0, None),
    ("float32 near 1e19", torch.float32, 1e19, None),
    ("fp16 norm past 65504", torch.float16, 3e3, None),
    ("NaN on rank 1", torch.float32, 1.0, (1, float("nan"))),
]


def _pieces(dtype, scale, rank, world_size):
    """This rank's pieces of one seeded vector: every ``world_size``-th tensor; rank 0 also holds a copy of
    a tensor declared replicated over the world."""
    full = _params((dtype,), 11, scale, device="cpu")
    mine = [p for i, p in enumerate(full) if i % world_size == rank]
    return [torch.nn.Parameter(p.detach().to(DEVICE)) for p in mine], full


def _rank_sharded(cases, norm_types):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = []
    for label, dtype, scale, inject in cases:
        for p in norm_types:
            mine, full = _pieces(dtype, scale, rank, world_size)
            for param, source in zip(mine, [q for i, q in enumerate(full) if i % world_size == rank]):
                param.grad = source.grad.to(DEVICE)
            if inject is not None and rank == inject[0] and mine:
                mine[0].grad.view(-1)[0] = inject[1]
            replica = torch.nn.Parameter(torch.zeros(3, device=DEVICE, dtype=dtype))
            replica.grad = torch.tensor([0.5, -0.25, 0.125], device=DEVICE, dtype=dtype)
            params = [*mine, {"params": [replica], "replicated_over": dist.group.WORLD}]
            norm = distclip.clip_grad_norm_(params, 1.0, p, group=dist.group.WORLD)
            out.append(dict(norm=norm.cpu(), device=norm.device.type, dtype=norm.dtype,
                            grads=[q.grad.cpu() for q in mine], replica=replica.grad.cpu()))
    empty = distclip.clip_grad_norm_([], 1.0, group=dist.group.WORLD) if rank == 1 else None
    if rank == 0:
        mine, full = _pieces(torch.float32, 1.0, 0, 1)
        for param, source in zip(mine, full):
            param.grad = source.grad.to(DEVICE)
        empty = distclip.clip_grad_norm_(mine, 1.0, group=dist.group.WORLD)
    return out, empty.cpu()


def _reference(dtype, scale, inject, world_size, p):
    full = _params((dtype,), 11, scale, device="cpu")
    grads = [q.grad.double() for q in full]
    if inject is not None:
        owned = [g for i, g in enumerate(grads) if i % world_size == inject[0]]
        owned[0].view(-1)[0] = inject[1]
    grads.append(torch.tensor([0.5, -0.25, 0.125], dtype=dtype).double())
    before = [q.grad for q in full]
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), p).item(), before


def test_sharded_on_device_over_gloo(worlds):
    world_size = 2
    results = worlds(world_size).run(_rank_sharded, CASES, SHARDED_NORM_TYPES, timeout=TIMEOUT_S)
    k = 0
    for label, dtype, scale, inject in CASES:
        for p in SHARDED_NORM_TYPES:
            ref, before = _reference(dtype, scale, inject, world_size, p)
            norms = [res[0][k]["norm"] for res in results]
            for r, res in enumerate(results):
                got = res[0][k]
                what = (label, p, r)
                assert got["dtype"] == torch.float64 and got["device"] == torch.device(DEVICE).type, what
                value = got["norm"].item()
                if math.isnan(ref):
                    assert math.isnan(value), what
                    continue
                assert math.isclose(value, ref, rel_tol=1e-5), (what, value, ref)
                c = min(1.0 / (ref + 1e-6), 1.0)
                mine = [g for i, g in enumerate(before) if i % world_size == r]
                rtol = 2e-5 if dtype == torch.float32 else 1e-2
                for g, b in zip(got["grads"], mine):
                    want = (b.double() * c).to(dtype)
                    torch.testing.assert_close(g, want, rtol=rtol, atol=1e-30 if scale > 1 else 1e-7, msg=str(what))
            assert all(torch.equal(bits(n), bits(norms[0])) for n in norms), (label, p, norms)
            k += 1
    empty_norms = [res[1] for res in results]  # rank 1 passed no gradients, rank 0 all of them
    assert torch.equal(empty_norms[0], empty_norms[1]) and empty_norms[0].item() > 0, empty_norms
