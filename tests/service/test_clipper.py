"""GradClipper with a fixed max_norm: bit for bit torch's clip, the options it refuses, and the wrapped models
it reads its layout from (FSDP2 and DDP named like the unwrapped model, FSDP1 refused for AGC and per-unit
norms) on a real gloo world.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip

from _service_helpers import INF, _backward, _model, agc_expected


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.5])
def test_fixed_threshold_is_bitwise_torch(norm_type):
    model, reference = _model(), _model()
    for m in (model, reference):
        _backward(m, 0)
    report = distclip.GradClipper(model, 0.5, norm_type).clip_()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, norm_type)
    assert torch.equal(report.norm, norm) and report.norm.dtype == norm.dtype
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_bad_options_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="nonfinite"):
        distclip.GradClipper(model, 1.0, nonfinite="ignore")
    with pytest.raises(ValueError, match="module target"):
        distclip.GradClipper(list(model.parameters()), 1.0, norms="module")
    with pytest.raises(ValueError, match="group="):
        distclip.GradClipper(model, 1.0, group=object())
    with pytest.raises(ValueError, match="max_norm"):
        distclip.GradClipper(model, -1.0)
    with pytest.raises(TypeError, match="policy"):
        distclip.GradClipper(model, 1.0, policy="zclip")
    with pytest.raises(ValueError, match="fused"):
        distclip.GradClipper(model, 1.0, fused=True, optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="AGC"):
        opt = torch.optim.Adam(model.parameters(), fused=True)
        distclip.GradClipper(model, 1.0, policy=distclip.AGC(), fused=True, optimizer=opt)


# --------------------------------------------------------------------------------------------- wrapped models


def _rank_wrapped_models():
    """FSDP2 with AGC and per-parameter norms (named like the unwrapped model); DDP's names; FSDP1 refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    out = {}
    model = _model()
    for layer in [model[0], model[2][0], model[2][1]]:
        fully_shard(layer)
    fully_shard(model)
    _backward(model, dist.get_rank())
    before = [p.grad.full_tensor() for p in model.parameters()]
    report = distclip.GradClipper(model, INF, policy=distclip.AGC(0.05), norms="parameter").clip_()
    out["fsdp2_names"] = report.unit_names
    out["fsdp2_norms"] = report.unit_norms.tolist()
    after = [p.grad.full_tensor() for p in model.parameters()]
    out["fsdp2"] = (before, after, [p.detach().full_tensor() for p in model.parameters()])

    ddp = nn.parallel.DistributedDataParallel(_model())
    _backward(ddp, dist.get_rank())
    out["ddp_names"] = distclip.GradClipper(ddp, 1.0, norms="module").clip_().unit_names

    fsdp1 = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), use_orig_params=True)
    for options in [dict(policy=distclip.AGC()), dict(norms="parameter")]:
        try:
            distclip.GradClipper(fsdp1, 1.0, **options)
        except ValueError as err:
            out.setdefault("fsdp1", []).append(str(err))
    return out


def test_wrapped_models(worlds):
    r = worlds(2).run(_rank_wrapped_models)[0]
    names = tuple(name for name, _ in _model().named_parameters())
    assert r["fsdp2_names"] == names and r["ddp_names"] == ("0", "2.0", "2.1")
    before, after, weights = r["fsdp2"]
    assert r["fsdp2_norms"] == pytest.approx([float(g.norm()) for g in before], rel=1e-5)
    for w, g, a in zip(weights, before, after):
        torch.testing.assert_close(a, agc_expected(w, g, 0.05))  # max_norm inf: coefficient 1
    assert len(r["fsdp1"]) == 2 and all("FSDP1" in e for e in r["fsdp1"])
