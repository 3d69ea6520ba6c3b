"""GradClipper's non-finite policies: ``propagate`` is torch's clip, ``raise`` raises and changes nothing
(gradients, policy state), ``skip`` leaves the gradients and counts the step; and with one rank's NaN in a
sharded gradient, ``raise`` raises on every rank.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip

from _service_helpers import INF, NAN, _backward, _grads, _model


def _poisoned(value):
    model = _model()
    _backward(model, 0)
    with torch.no_grad():
        next(model.parameters()).grad[0, 0] = value
    return model


@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_propagate_is_torch(value):
    model, reference = _poisoned(value), _poisoned(value)
    report = distclip.GradClipper(model, 0.5, nonfinite="propagate").clip_()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert bool(report.nonfinite) and not report.skipped
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)


def test_nonfinite_raise_changes_nothing():
    model = _poisoned(NAN)
    before = _grads(model)
    policy = distclip.ZClip(warmup_steps=2)
    with pytest.raises(RuntimeError, match="non-finite"):
        distclip.GradClipper(model, 0.5, nonfinite="raise", policy=policy).clip_()
    for g, p in zip(before, model.parameters()):
        torch.testing.assert_close(g, p.grad, equal_nan=True, rtol=0, atol=0)
    assert int(policy.state_dict()["count"]) == 0


def test_nonfinite_skip_keeps_the_gradients_and_counts():
    model = _poisoned(INF)
    before = _grads(model)
    clipper = distclip.GradClipper(model, 0.5, nonfinite="skip")
    report = clipper.clip_()
    assert report.skipped and bool(report.nonfinite) and float(report.coefficient) == 1.0
    assert int(report.skipped_steps) == 1 and not bool(report.clipped)
    for g, p in zip(before, model.parameters()):
        assert torch.equal(g, p.grad)
    model.zero_grad()
    _backward(model, 1)
    report = clipper.clip_()
    assert not report.skipped and int(report.skipped_steps) == 1 and int(report.steps) == 2


# ---------------------------------------------------------------------------------------------------- sharded


def _rank_raise_on_nonfinite():
    """Rank 1's piece holds a NaN: with nonfinite="raise" both ranks raise, and no gradient changed."""
    piece = torch.full((3,), 2.0 + dist.get_rank())
    if dist.get_rank() == 1:
        piece[1] = NAN
    param = nn.Parameter(torch.zeros(3))
    param.grad = piece.clone()
    try:
        distclip.GradClipper([param], 0.1, nonfinite="raise", group=dist.group.WORLD).clip_()
    except RuntimeError as err:
        return str(err), torch.equal(param.grad.nan_to_num(), piece.nan_to_num())
    return None, False


def test_sharded_nonfinite_raise_raises_on_every_rank(worlds):
    for message, unchanged in worlds(2).run(_rank_raise_on_nonfinite):
        assert message is not None and "non-finite" in message and unchanged
