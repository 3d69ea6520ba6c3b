"""group=None: distclip must be bitwise identical to the installed torch.nn.utils.

Each case builds the same parameters twice from a seed, runs torch on one copy and distclip on the other
(``_tester.compare``), and compares the returned value (bits, dtype, device), the gradients after the call
(bits, and the same tensor objects), the warnings (category, message, line) and the exceptions (type and
message).

This file: ``clip_grad_norm_`` (and the deprecated ``clip_grad_norm``) over dtypes, norm types, foreach,
argument forms, max_norm values, no or non-finite gradients, and gradients that carry a graph.
"""

import math

import pytest
import torch
import torch.nn.utils as tnu

import distclip
from _tester import TORCH_NORM_TYPES, Spec, assert_bitwise, call, compare, simple_spec


@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_norm_mixed_dtypes(norm_type, foreach):
    spec = Spec([((5,), torch.float32, True, 3.0), ((2, 3), torch.float64, True, 0.1),
                 ((4,), torch.bfloat16, True, 20.0), ((3, 3), torch.float16, False, 1.0),
                 ((7,), torch.float16, True, 2.0), ((), torch.float32, True, 5.0)])
    compare(spec, "clip_grad_norm_", max_norm=1.0, norm_type=norm_type, foreach=foreach)


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "tensor"])
@pytest.mark.parametrize("max_norm", [0.5, 1, 1e6, 0.0, math.inf])
def test_argument_forms(form, max_norm):
    compare(simple_spec((torch.float32, torch.float32)), "clip_grad_norm_", form, max_norm=max_norm)


def test_empty_generator_warns_like_torch():
    out = compare(Spec(), "clip_grad_norm_", "generator", max_norm=1.0)
    assert float(out) == 0.0


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grad_norm"])
def test_no_gradients_returns_zero(name):
    out = compare(simple_spec(grads=False), name, max_norm=1.0)
    assert out.dtype == torch.get_default_dtype() and float(out) == 0.0


def test_deprecated_alias_warns_future_warning():
    compare(simple_spec(), "clip_grad_norm", max_norm=1.0, norm_type=3.0)
    _, caught = call(distclip.clip_grad_norm, simple_spec().build(), 1.0)
    assert caught[0][0] is FutureWarning and "distclip.clip_grad_norm_" in caught[0][1]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_nonfinite_gradients(bad, error_if_nonfinite, norm_type):
    spec = simple_spec((torch.float32, torch.bfloat16), inject={1: bad})
    compare(spec, "clip_grad_norm_", max_norm=1.0, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
    compare(spec, "get_total_norm", norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)


def test_nonfinite_error_leaves_gradients_unchanged():
    spec = simple_spec(inject={0: math.nan})
    params = spec.build()
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        assert_bitwise(p.grad, b)


def test_no_autograd_history():
    """A gradient that carries a graph (create_graph=True) is scaled without recording a new graph node."""

    def param_with_graph_grad():
        w = torch.nn.Parameter(torch.arange(1.0, 5.0))
        w.grad = torch.autograd.grad((w * w).sum(), w, create_graph=True)[0]
        return w

    ours, theirs = param_with_graph_grad(), param_with_graph_grad()
    node_before = ours.grad.grad_fn
    out = distclip.clip_grad_norm_([ours], 0.1)
    assert_bitwise(out, tnu.clip_grad_norm_([theirs], 0.1))
    assert_bitwise(ours.grad, theirs.grad)
    assert out.grad_fn is None and not out.requires_grad
    assert ours.grad.grad_fn is node_before


def test_empty_tensors_and_zero_gradients():
    spec = Spec([((0,), torch.float32, True, 1.0), ((3,), torch.float32, True, 0.0)])
    for norm_type in [2.0, math.inf, -math.inf, 0.0, 0.5]:
        compare(spec, "clip_grad_norm_", max_norm=1.0, norm_type=norm_type)


def test_nan_and_negative_max_norm_follow_torch():
    """torch accepts these on one process (NaN or sign-flipped gradients): parity wins over validation."""
    for max_norm in [math.nan, -1.0, "2.5", True, torch.tensor(0.5)]:
        compare(simple_spec(), "clip_grad_norm_", max_norm=max_norm)
