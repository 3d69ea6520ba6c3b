"""group=None: distclip must be bitwise identical to the installed torch.nn.utils.

Each case builds the same parameters twice from a seed, runs torch on one copy and distclip on the other
(``_tester.compare``), and compares the returned value (bits, dtype, device), the gradients after the call
(bits, and the same tensor objects), the warnings (category, message, line) and the exceptions (type and
message).

This file: ``get_total_norm``, ``clip_grads_with_norm_`` and ``clip_grad_value_``, and ``foreach=True`` on a
device without foreach kernels.
"""

import math

import pytest
import torch
import torch.nn.utils as tnu

import distclip
from _tester import TORCH_NORM_TYPES, Spec, assert_bitwise, call, compare, simple_spec


@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_get_total_norm_of_tensors(norm_type):
    tensors_spec = Spec([((4,), torch.float32, False, 1.0), ((2, 2), torch.bfloat16, False, 1.0)])
    theirs, ours = tensors_spec.build(), tensors_spec.build()
    expected = tnu.get_total_norm([t.detach() for t in theirs], norm_type)
    got = distclip.get_total_norm([t.detach() for t in ours], norm_type)
    assert_bitwise(got, expected)
    compare(simple_spec((torch.float64,)), "get_total_norm", "tensor", norm_type=norm_type)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grads_with_norm(foreach):
    total = torch.tensor(7.5)
    compare(simple_spec((torch.float32, torch.float16)), "clip_grads_with_norm_", max_norm=1.0,
            total_norm=total, foreach=foreach)
    compare(simple_spec(), "clip_grads_with_norm_", "generator", max_norm=2, total_norm=total.double())


@pytest.mark.parametrize("clip_value", [0.1, 1, 1e9, 0.0, "0.5"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_value(clip_value, foreach):
    spec = simple_spec((torch.float32, torch.bfloat16, torch.float64), inject={0: math.nan, 1: math.inf})
    compare(spec, "clip_grad_value_", clip_value=clip_value, foreach=foreach)
    compare(spec, "clip_grad_value_", "generator", clip_value=clip_value, foreach=foreach)


def test_foreach_true_on_unsupported_device_raises_like_torch():
    params = [torch.nn.Parameter(torch.ones(3, device="meta")) for _ in range(2)]
    for p in params:
        p.grad = torch.ones(3, device="meta")
    for fn, kwargs in [("clip_grad_norm_", dict(max_norm=1.0)), ("clip_grad_value_", dict(clip_value=1.0)),
                       ("get_total_norm", {})]:
        expected, _ = call(getattr(tnu, fn), params, foreach=True, **kwargs)
        got, _ = call(getattr(distclip, fn), params, foreach=True, **kwargs)
        assert type(got) is type(expected) is RuntimeError and str(got) == str(expected)
