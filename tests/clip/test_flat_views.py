"""Gradients that are the consecutive views of one buffer (ZeRO partitions, FSDP1 flat shards, DDP buckets) are
read and scaled as one flat tensor (the layout's ``flat``); anything else takes the per-tensor path. Both must
give the same numbers, and the elements of the buffer outside the gradients stay as they are.
"""

import math

import pytest
import torch
import torch.distributed as dist

import distclip

INF = math.inf

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
