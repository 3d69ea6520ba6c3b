"""Policies inside GradClipper: the clip threshold is ``min(max_norm, policies)``, the coefficient and the skip
follow it step by step; and on 2 gloo ranks holding pieces of one gradient, every rank takes the same
decisions (the same bits), skips together (a spike, one rank's NaN), ends with the same state, and a clipper
resumed from that state replays the same steps.

Rank-side functions are at module level (the harness pickles them by reference). Nothing is mocked; the one
patch is the host-synchronisation trap (``_service_helpers._no_host_sync``).
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip

from _service_helpers import NAN, POLICIES, _backward, _grads, _model, _no_host_sync, _norm_sequence


def test_policy_threshold_caps_with_max_norm_and_sets_the_coefficient():
    model = _model(dtype=torch.float64)
    clipper = distclip.GradClipper(model, 2.0, policy=[distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)])
    twin = [distclip.ZClip(warmup_steps=3), distclip.SpikeSkip(8, 3.0, 3)]
    for t, scale in enumerate(_norm_sequence(14)):
        model.zero_grad()
        _backward(model, t, scale)
        before = _grads(model)
        report = clipper.clip_()
        g = report.norm.to(torch.float64)
        zclip, skip = (policy.decide(g) for policy in twin)
        assert torch.equal(report.threshold, torch.clamp(zclip, max=2.0))
        assert torch.equal(report.skip_threshold, skip)
        skipped = bool(g > skip)
        assert report.skipped == skipped, t
        coefficient = 1.0 if skipped else min(float(report.threshold) / (float(g) + 1e-6), 1.0)
        assert float(report.coefficient) == pytest.approx(coefficient, rel=1e-12)
        for b, p in zip(before, model.parameters()):
            torch.testing.assert_close(p.grad, b * coefficient, rtol=1e-12, atol=0)
    assert int(report.skipped_steps) == 1  # the spike at step 9


# ---------------------------------------------------------------------------------------------------- sharded


def _rank_sharded_run(steps, trap):
    """Each rank holds its own, differently sized pieces of one logical float64 vector (group=WORLD); the
    vector's scale follows _norm_sequence. Returns every step's report and gradients, the state after step 10
    and a resumed clipper's reports for steps 11..15."""
    rank = dist.get_rank()
    full = torch.randn(23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pieces = full.split([3, 4, 9, 7])
    mine = [pieces[0], pieces[1]] if rank == 0 else [pieces[2], pieces[3]]
    params = [nn.Parameter(torch.zeros_like(p)) for p in mine]

    def make():
        return distclip.GradClipper(params, 20.0, policy=POLICIES["all"](), nonfinite="skip", norms="parameter",
                                    group=dist.group.WORLD)

    def step(clipper, t, scale, trapped):
        for p, piece in zip(params, mine):
            p.grad = piece * scale * (1 + 0.01 * t)
        if t == 12:
            params[0].grad[0] = NAN if rank == 1 else params[0].grad[0]  # one rank's NaN: a skip on both
        with _no_host_sync() if trap and trapped else contextlib.nullcontext():
            report = clipper.clip_()
        return report.as_dict(host=True), [p.grad.clone() for p in params]

    clipper, results, state = make(), [], None
    for t, scale in enumerate(_norm_sequence(steps)):
        results.append(step(clipper, t, scale, t > 0))  # the first call checks the ranks' arguments
        if t == 10:
            state = copy.deepcopy(clipper.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    replay = [step(resumed, t, scale, t > 11) for t, scale in enumerate(_norm_sequence(steps)) if 10 < t <= 15]
    return dict(results=results, replay=replay, state=clipper.state_dict())


def test_sharded_ranks_take_the_same_decisions_and_skip_together(worlds):
    steps = 16
    r0, r1 = worlds(2).run(_rank_sharded_run, steps, True)
    full = torch.randn(23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for t, scale in enumerate(_norm_sequence(steps)):
        a, b = r0["results"][t][0], r1["results"][t][0]
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), t  # same bits
        if t != 12:
            assert a["norm"] == pytest.approx(float(full.norm()) * scale * (1 + 0.01 * t), rel=1e-12)
        assert a["skipped"] == float(t in (9, 12)), t  # the spike, and one rank's NaN
    assert r0["results"][12][0]["nonfinite"] == 1.0
    for rank_result in (r0, r1):  # skipped steps leave the gradients as they were
        spike_grads = rank_result["results"][9][1]
        assert max(float(g.abs().max()) for g in spike_grads) > 5
    for k, a in r0["state"]["counters"].items():
        assert torch.equal(a, r1["state"]["counters"][k])
    for a, b in zip(r0["state"]["policies"], r1["state"]["policies"]):
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    for r in (r0, r1):  # resumed after step 10: the same next 5 steps
        for (d, g), (d2, g2) in zip(r["replay"], r["results"][11:16]):
            assert d == pytest.approx(d2, nan_ok=True)
            assert all(torch.equal(x, y) or torch.isnan(x).any() for x, y in zip(g, g2))
