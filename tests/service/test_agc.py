"""AGC (adaptive gradient clipping, unit-wise): its factors against the formula in Python floats; in
GradClipper, each unit scaled by its factor with max_norm bounding the total; and over DTensors sharded by
rows, across rows, replicated, on 2 gloo ranks, the same as AGC on the full tensors, in 4 collectives.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked.
"""

import pytest
import torch
from torch import nn

import distclip
from distclip._service import agc as _agc

from _service_helpers import _backward, _grads, _model, agc_expected


def test_agc_factors_follow_the_unitwise_formula():
    torch.manual_seed(0)
    conv, linear = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(5, 6)
    params = [conv.weight, conv.bias, linear.weight, linear.bias]
    for p in params:
        p.grad = torch.randn_like(p) * torch.rand(()) * 3
    params[3].grad = torch.zeros_like(params[3])  # a zero gradient: factor 1, no division by zero
    agc = distclip.AGC(clipping=0.05, eps=1e-3)
    for p, (grad, factors) in zip(params, _agc.unit_factors(agc, params)):
        assert grad is p.grad
        w = p.detach().double().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().double().reshape(1, -1)
        g = p.grad.double().reshape(w.shape)
        unit_norms = zip(w.norm(dim=1).tolist(), g.norm(dim=1).tolist())
        want = [min(1.0, 0.05 * max(wn, 1e-3) / max(gn, 1e-6)) for wn, gn in unit_norms]
        assert factors.flatten().tolist() == pytest.approx(want, rel=1e-6)
        assert factors.shape == ((p.shape[0],) + (1,) * (p.ndim - 1) if p.ndim > 1 else ())


def test_agc_scales_each_unit_by_its_factor_and_max_norm_bounds_the_total():
    model = _model(dtype=torch.float64)
    _backward(model, 0)
    before = _grads(model)
    report = distclip.GradClipper(model, 3.0, policy=distclip.AGC(clipping=0.02)).clip_()
    coefficient = min(3.0 / (float(report.norm) + 1e-6), 1.0)
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, agc_expected(p.detach(), b, 0.02, coefficient), rtol=1e-12, atol=0)
    grads_after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(report.post_norm) == pytest.approx(float(grads_after.norm()), rel=1e-12)
    assert bool(report.clipped) and float(report.post_norm) <= 3.0


# ---------------------------------------------------------------------------------------------------- sharded


def _rank_dtensor_agc():
    """AGC over DTensors on a 1-D mesh of 2 ranks: rows local (Shard(0)), rows split (Shard(1)), a sharded
    1-D bias, a replicated weight. Returns the full gradients before and after, the weights, the number of
    collectives, and the per-parameter norms."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    layout = [((6, 4), Shard(0)), ((5, 6), Shard(1)), ((7,), Shard(0)), ((3, 2), Replicate())]
    params = []
    for shape, placement in layout:
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        param = nn.Parameter(distribute_tensor(weight, mesh, [placement], src_data_rank=None))
        param.grad = distribute_tensor(grad, mesh, [placement], src_data_rank=None)
        params.append(param)
    before = [p.grad.full_tensor() for p in params]
    clipper = distclip.GradClipper(params, 4.0, policy=distclip.AGC(clipping=0.3), norms="parameter")
    clipper.clip_()  # the first call also checks the ranks' arguments
    for p, g in zip(params, before):
        p.grad = distribute_tensor(g.clone(), mesh, p.placements, src_data_rank=None)
    with CommDebugMode() as comms:
        report = clipper.clip_()
    return dict(
        before=before, after=[p.grad.full_tensor() for p in params], weights=[p.detach().full_tensor() for p in params],
        collectives=comms.get_total_counts(), report=report.as_dict(host=True),
    )


def test_agc_on_sharded_rows_equals_agc_on_the_full_tensors(worlds):
    results = worlds(2).run(_rank_dtensor_agc)
    r = results[0]
    total = torch.cat([g.flatten() for g in r["before"]]).norm()
    coefficient = min(4.0 / (float(total) + 1e-6), 1.0)
    for w, g, after in zip(r["weights"], r["before"], r["after"]):
        torch.testing.assert_close(after, agc_expected(w, g, 0.3, coefficient), rtol=1e-12, atol=0)
    # the norm, the AGC sums over the mesh (one for the Shard(1) weight and the 1-D bias), the post-clip
    # norm, and the per-parameter norms
    assert r["collectives"] == 4
    assert r["report"]["norm"] == pytest.approx(float(total), rel=1e-12)
    assert [r["report"][f"norm/{i}"] for i in range(4)] == pytest.approx([float(g.norm()) for g in r["before"]])
    assert results[1]["report"] == r["report"]
