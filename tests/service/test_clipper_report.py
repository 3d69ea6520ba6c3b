"""GradClipper's report: its fields and counters, ``as_dict`` on the device and on the host, and the
per-parameter and per-module norms (names from the module, or the parameters' indices)."""

import math

import pytest
import torch
from torch import nn

import distclip

from _service_helpers import INF, _backward, _model


def test_report_fields_and_as_dict():
    model = _model()
    clipper = distclip.GradClipper(model, 0.5)
    _backward(model, 0)
    first = clipper.clip_()
    model.zero_grad()
    _backward(model, 1, scale=1e-3)  # a norm below 0.5
    second = clipper.clip_()
    assert float(first.threshold) == 0.5 and bool(first.clipped) and not bool(second.clipped)
    assert float(first.coefficient) == pytest.approx(0.5 / (float(first.norm) + 1e-6))
    assert float(first.post_norm) == pytest.approx(0.5, rel=1e-5)
    assert float(second.coefficient) == 1.0 and float(second.post_norm) == float(second.norm)
    assert (int(second.steps), int(second.clipped_steps), float(second.clip_rate)) == (2, 1, 0.5)
    assert not first.may_skip and not first.skipped and not bool(first.nonfinite)
    logged = first.as_dict("grad/", host=True)
    assert set(logged) == {f"grad/{k}" for k in ("norm", "post_norm", "threshold", "coefficient", "clipped",
                                                 "nonfinite", "clip_rate")}
    assert all(type(v) is float for v in logged.values()) and logged["grad/clipped"] == 1.0
    on_device = first.as_dict()
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in on_device.values())
    assert on_device["norm"].item() == logged["grad/norm"]


def test_per_parameter_and_per_module_norms():
    model = _model()
    _backward(model, 0)
    grads = dict((name, p.grad.clone()) for name, p in model.named_parameters())
    for kind, p in [("parameter", 2.0), ("module", 2.0), ("parameter", INF), ("module", 1.0)]:
        for (name, param) in model.named_parameters():
            param.grad = grads[name].clone()
        report = distclip.GradClipper(model, 0.1, p, norms=kind).clip_()
        units = {}
        for name, g in grads.items():
            units.setdefault(name if kind == "parameter" else name.rpartition(".")[0], []).append(g)
        assert report.unit_names == tuple(units)
        want = [torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]), p) for gs in units.values()]
        torch.testing.assert_close(report.unit_norms, torch.stack(want))
        assert set(report.as_dict()) >= {f"norm/{name}" for name in units}


def test_parameters_target_with_declared_groups_and_index_names():
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(4))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    report = distclip.GradClipper([params[0], params[1], params[2]], 100.0, norms="parameter").clip_()
    assert report.unit_names == ("0", "1", "2")
    assert report.unit_norms.tolist() == pytest.approx([math.sqrt(3), 2 * math.sqrt(2), 6.0])
