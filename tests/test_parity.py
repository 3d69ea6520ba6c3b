"""group=None: distclip must be bitwise identical to the installed torch.nn.utils.

Each case builds the same parameters twice from a seed, runs torch on one copy and distclip on the other,
and compares the returned value (bits, dtype, device), the gradients after the call (bits, and the same
tensor objects), the warnings (category, message, line) and the exceptions (type and message).
"""

import math
import random

import pytest
import torch
import torch.nn.utils as tnu

import distclip
from _tester import DTYPES, TORCH_NORM_TYPES, Spec, assert_bitwise, call, compare

def simple(dtypes=(torch.float32,), scale=10.0, grads=True, **kw) -> Spec:
    return Spec([((3, 4), d, grads, scale) for d in dtypes], **kw)


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
    compare(simple((torch.float32, torch.float32)), "clip_grad_norm_", form, max_norm=max_norm)


def test_empty_generator_warns_like_torch():
    out = compare(Spec(), "clip_grad_norm_", "generator", max_norm=1.0)
    assert float(out) == 0.0


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grad_norm"])
def test_no_gradients_returns_zero(name):
    out = compare(simple(grads=False), name, max_norm=1.0)
    assert out.dtype == torch.get_default_dtype() and float(out) == 0.0


def test_deprecated_alias_warns_future_warning():
    compare(simple(), "clip_grad_norm", max_norm=1.0, norm_type=3.0)
    _, caught = call(distclip.clip_grad_norm, simple().build(), 1.0)
    assert caught[0][0] is FutureWarning and "distclip.clip_grad_norm_" in caught[0][1]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_nonfinite_gradients(bad, error_if_nonfinite, norm_type):
    spec = simple((torch.float32, torch.bfloat16), inject={1: bad})
    compare(spec, "clip_grad_norm_", max_norm=1.0, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
    compare(spec, "get_total_norm", norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)


def test_nonfinite_error_leaves_gradients_unchanged():
    spec = simple(inject={0: math.nan})
    params = spec.build()
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        assert_bitwise(p.grad, b)


@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_get_total_norm_of_tensors(norm_type):
    tensors_spec = Spec([((4,), torch.float32, False, 1.0), ((2, 2), torch.bfloat16, False, 1.0)])
    theirs, ours = tensors_spec.build(), tensors_spec.build()
    expected = tnu.get_total_norm([t.detach() for t in theirs], norm_type)
    got = distclip.get_total_norm([t.detach() for t in ours], norm_type)
    assert_bitwise(got, expected)
    compare(simple((torch.float64,)), "get_total_norm", "tensor", norm_type=norm_type)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grads_with_norm(foreach):
    total = torch.tensor(7.5)
    compare(simple((torch.float32, torch.float16)), "clip_grads_with_norm_", max_norm=1.0,
            total_norm=total, foreach=foreach)
    compare(simple(), "clip_grads_with_norm_", "generator", max_norm=2, total_norm=total.double())


@pytest.mark.parametrize("clip_value", [0.1, 1, 1e9, 0.0, "0.5"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_value(clip_value, foreach):
    spec = simple((torch.float32, torch.bfloat16, torch.float64), inject={0: math.nan, 1: math.inf})
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
        compare(simple(), "clip_grad_norm_", max_norm=max_norm)


def test_random_sweep():
    """Hundreds of seeded random cases over every argument, each compared bitwise with torch."""
    rng = random.Random(1234)
    for case in range(400):
        count = rng.randint(0, 6)
        spec = Spec(
            [(tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3))), rng.choice(DTYPES),
              rng.random() > 0.2, 10 ** rng.uniform(-4, 4)) for _ in range(count)],
            inject={i: rng.choice([math.nan, math.inf, -math.inf]) for i in range(count) if rng.random() < 0.05},
            seed=case,
        )
        form = rng.choice(["list", "tuple", "generator"] + (["tensor"] if count == 1 else []))
        foreach = rng.choice([None, True, False])
        norm_type = rng.choice(TORCH_NORM_TYPES)
        error_if_nonfinite = rng.random() < 0.3
        which = rng.random()
        if which < 0.6:
            compare(spec, "clip_grad_norm_", form, max_norm=10 ** rng.uniform(-2, 3), norm_type=norm_type,
                    error_if_nonfinite=error_if_nonfinite, foreach=foreach)
        elif which < 0.8:
            compare(spec, "get_total_norm", form, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                    foreach=foreach)
        else:
            compare(spec, "clip_grad_value_", form, clip_value=10 ** rng.uniform(-2, 2), foreach=foreach)


class TestBadInput:
    """Inputs torch rejects get an error of a compatible type that says what was wrong."""

    def test_non_tensor_parameter(self):
        params = simple().build() + [3]
        with pytest.raises(TypeError, match=r"parameters\[1\]` is of type int, not a tensor"):
            distclip.clip_grad_norm_(params, 1.0)
        with pytest.raises(AttributeError):  # what torch raises, for handlers written against it
            distclip.clip_grad_value_(params, 1.0)

    def test_non_iterable_parameters(self):
        with pytest.raises(TypeError, match="must be a Tensor or an iterable of Tensors"):
            distclip.clip_grad_norm_(5, 1.0)

    @pytest.mark.parametrize("value, error", [(None, TypeError), ("abc", ValueError), (1j, TypeError)])
    def test_max_norm_not_a_number(self, value, error):
        with pytest.raises(error, match="`max_norm` must be a real number"):
            distclip.clip_grad_norm_(simple().build(), value)
        with pytest.raises(error, match="`clip_value` must be a real number"):
            distclip.clip_grad_value_(simple().build(), value)

    def test_unknown_norm_type_string(self):
        with pytest.raises(ValueError, match="`norm_type` must be a real number.*'fro'"):
            distclip.clip_grad_norm_(simple().build(), 1.0, norm_type="fro")

    def test_group_without_initialized_process_group(self):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            distclip.clip_grad_norm_(simple().build(), 1.0, group=object())
